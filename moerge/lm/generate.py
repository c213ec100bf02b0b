"""Batched greedy generation and exact-match scoring: one evaluator for base models, experts,
merges and routed models alike (anything with a transformers-style ``generate``)."""

from __future__ import annotations

from typing import Sequence

import torch

from moerge.lm.chat import prompt_ids
from moerge.lm.device import model_device, to_device
from moerge.lm.example import Example


def encode_left_padded(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as the model sees them (``prompt_ids``: chat template or bos + text), left-padded."""
    return left_pad(prompt_ids(tokenizer, prompts), tokenizer.pad_token_id)


def left_pad(ids: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token id lists, left-padded to the longest."""
    width = max(len(p) for p in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, p in enumerate(ids):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return input_ids, mask


@torch.no_grad()
def greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 128) -> list[str]:
    """Completions of ``prompts`` (left-padded batches, greedy, stop at end-of-sequence)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[str] = []
    model.eval()
    device = model_device(model)
    for s in range(0, len(prompts), batch_size):
        batch = to_device(dict(zip(("ids", "mask"), encode_left_padded(tokenizer, prompts[s: s + batch_size]))), device)
        input_ids, mask = batch["ids"], batch["mask"]
        width = input_ids.shape[1]
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True))
    return out


def exact_match(model, tokenizer, rows: Sequence[Example], **kw) -> float:
    """Share of rows whose greedy completion is exactly the answer. Generation stops after the longest
    answer's length (in tokens) plus end-of-sequence and one more: a longer output is wrong anyway, and
    no right answer is cut short (the real-model suite's answers run to 20 tokens)."""
    if not rows:
        return 0.0
    if "max_new_tokens" not in kw:
        kw["max_new_tokens"] = 2 + max(len(ids) for ids in tokenizer([r.completion for r in rows],
                                                                      add_special_tokens=False)["input_ids"])
    preds = greedy(model, tokenizer, [r.prompt for r in rows], **kw)
    return sum(p == r.completion for p, r in zip(preds, rows)) / len(rows)
