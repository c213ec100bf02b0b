"""Prompt embeddings from the base model: mean-pooled final hidden states over the real tokens.
Used for task centroids (stored in expert cards at training time) and by the centroid router."""

from __future__ import annotations

from typing import Sequence

import torch

from moerge.eval.generate import encode_left_padded


@torch.no_grad()
def mean_pooled(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    h = out.hidden_states[-1].float()
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def prompt_centroid(model, tokenizer, prompts: Sequence[str], batch_size: int = 128) -> list[float]:
    """The mean embedding of ``prompts``: an expert's task centroid."""
    total = None
    for s in range(0, len(prompts), batch_size):
        ids, mask = encode_left_padded(tokenizer, prompts[s: s + batch_size])
        e = mean_pooled(model, ids, mask).sum(0)
        total = e if total is None else total + e
    return (total / len(prompts)).tolist()
