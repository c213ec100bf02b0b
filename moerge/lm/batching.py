"""Prompt/completion rows as token batches, and the loss and log-likelihood of their completions.

Batches are padded to their own longest sequence; the labels cover the completion and the
end-of-sequence token only. The model's output head runs only over the batch's completion positions
(``completion_loss``): on a real vocabulary (49k tokens) the head over every prompt position was a
fifth of a training step. Training, data-aware merge statistics, LoraHub and DPO all batch this way.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
import torch.nn.functional as F

from moerge.lm.base import contiguous_input
from moerge.lm.chat import prompt_ids
from moerge.lm.device import model_device, to_device
from moerge.lm.example import Example


def encode(tokenizer, rows: Sequence[Example]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion + eos, number of prompt tokens) per row; the prompt as
    ``prompt_ids`` renders it (chat template, or bos + text)."""
    prompts = prompt_ids(tokenizer, [r.prompt for r in rows])
    answers = tokenizer([r.completion for r in rows], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + a + [eos], len(p)) for p, a in zip(prompts, answers)]


def collate(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _inner(model):
    """The transformers model under a wrapper (a PEFT model, the gate trainer), which passes its
    keyword arguments through to it."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    return _takes_keep(type(_inner(model)))


@functools.lru_cache(maxsize=None)
def _takes_keep(cls) -> bool:  # once per model class: this is asked on every training step
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token cross-entropy over the labelled (completion) positions, the same number as
    ``model(**batch).loss``, with the output head run from the first labelled position on only.
    The model's own forward computes the logits (so any logit scaling or soft-capping it applies is
    kept); models without ``logits_to_keep`` get the full forward."""
    labels = batch["labels"]
    labelled = labels != -100
    if not _keeps_logits(model) or not bool(labelled.any()):
        return model(**batch).loss
    width = labels.shape[1]
    first = max(1, int(labelled.int().argmax(1)[labelled.any(1)].min()))  # the earliest labelled column (column 0 has no prediction)
    keep = width - first + 1  # logits at column j predict the token at j + 1
    head = _inner(model).get_output_embeddings()
    hook = head.register_forward_pre_hook(contiguous_input) if head is not None else None
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    finally:
        if hook is not None:
            hook.remove()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, first:].flatten(), ignore_index=-100)


@torch.no_grad()
def completion_logps(model, tokenizer, rows: Sequence[Example], *, batch_size: int = 32) -> torch.Tensor:
    """log p(completion + eos | prompt) of each row, summed over its tokens: the sequence score a
    preference compares (DPO's implicit reward is its change against the reference model)."""
    model.eval()
    encoded = encode(tokenizer, rows)
    device = model_device(model)
    out = []
    for s in range(0, len(encoded), batch_size):
        batch = to_device(collate(encoded[s: s + batch_size], tokenizer.pad_token_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((token * (labels != -100)).sum(1))
    return torch.cat(out).cpu() if out else torch.zeros(0)
