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


def embed_prompts(model, tokenizer, prompts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    return torch.cat([mean_pooled(model, *encode_left_padded(tokenizer, prompts[s: s + batch_size]))
                      for s in range(0, len(prompts), batch_size)])


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """k unit-norm centroids of the rows of ``x`` by cosine (deterministic for a seed)."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    k = min(k, len(x))
    c = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return c


def task_centroids(model, tokenizer, prompts: Sequence[str], k: int = 8) -> tuple[list[float], list[list[float]]]:
    """An expert's task embedding: the mean of its prompts' embeddings, and ``k`` spherical k-means
    centroids. A task's prompts are rarely one cluster (each paraphrase of an instruction forms its
    own), so the nearest of several centroids routes far better than one mean (see README)."""
    e = embed_prompts(model, tokenizer, prompts)
    return e.mean(0).tolist(), spherical_kmeans(e, k).tolist()
