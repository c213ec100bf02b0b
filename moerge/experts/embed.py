"""Prompt embeddings for task-level routing, and the task centroids expert cards carry.

By default an embedding is the base model's mean-pooled final hidden states over the real tokens
(``centroid``/``centroids`` in the card, recorded by ``expert train``). A sentence-embedding model
(any sentence-transformers folder or hub id) can stand in: its centroids live in the card under
``embeddings[<embedder id>]``, recorded by ``expert train --embedder`` or ``expert embed``, and the
id (a fingerprint of the model's weights) makes sure routing embeds prompts with the same model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from moerge.errors import MoergeError
from moerge.io.fingerprint import folder_fingerprint
from moerge.lm import base as base_model
from moerge.lm.device import model_device, to_device
from moerge.lm.generate import encode_left_padded


@torch.no_grad()
def mean_pooled(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    h = out.hidden_states[-1].float()
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def embed_prompts(model, tokenizer, prompts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states of ``prompts``, computed where the model is, returned on the CPU."""
    device, out = model_device(model), []
    for s in range(0, len(prompts), batch_size):
        batch = to_device(dict(zip(("ids", "mask"), encode_left_padded(tokenizer, prompts[s: s + batch_size]))), device)
        out.append(mean_pooled(model, batch["ids"], batch["mask"]).cpu())
    return torch.cat(out)


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
    return centroids_of(embed_prompts(model, tokenizer, prompts), k)


class SentenceEmbedder:
    """A sentence-transformers model (needs ``pip install 'moerge[embed]'``); unit-norm embeddings."""

    def __init__(self, name_or_path: str | os.PathLike):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MoergeError("a sentence-embedding model needs sentence-transformers: pip install 'moerge[embed]'") from None

        self.name = str(name_or_path)
        local = Path(name_or_path)
        if local.exists() and not (local / "modules.json").is_file() and not (local / "config.json").is_file():
            raise MoergeError(f"{local}: not a sentence-embedding model folder (no modules.json or config.json)")
        try:
            self.model = SentenceTransformer(self.name, device="cpu")
        except Exception as e:  # hub errors, unreadable folders: one line, with the cause
            raise MoergeError(f"{self.name}: cannot load it as a sentence-embedding model ({type(e).__name__}: {e})") from None
        self.id = "st:" + (folder_fingerprint(local) if local.is_dir() else self.name)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.encode(list(prompts), convert_to_tensor=True, normalize_embeddings=True, batch_size=128,
                                 show_progress_bar=False).float().cpu()


def centroids_of(embeddings: torch.Tensor, k: int = 8) -> tuple[list[float], list[list[float]]]:
    """(mean, k spherical k-means centroids) of a task's prompt embeddings, rounded for the card."""
    return ([round(c, 5) for c in embeddings.mean(0).tolist()],
            [[round(c, 5) for c in row] for row in spherical_kmeans(embeddings, k).tolist()])


def record_embedding(card: dict, embedder: SentenceEmbedder, prompts: Sequence[str]) -> dict:
    """The card with the embedder's centroids of ``prompts`` under ``embeddings[embedder.id]``."""
    mean, cents = centroids_of(embedder(prompts))
    entry = {"model": embedder.name, "centroid": mean, "centroids": cents}
    return card | {"embeddings": dict(card.get("embeddings") or {}) | {embedder.id: entry}}


def with_task_embedding(card: dict, prompts: Sequence[str], *, base: str | os.PathLike | None = None,
                        embedder: str | os.PathLike | None = None, limit: int = 256) -> tuple[dict, dict]:
    """(the card with task centroids of up to ``limit`` of ``prompts``, what was recorded). By default
    the base model's: ``centroid``, ``centroids`` and ``centroid_base``, the base's fingerprint, since
    they only mean something on that base; with ``embedder``, that sentence-embedding model's, under
    ``embeddings[its id]``."""
    prompts = list(prompts)[:limit]
    if embedder is not None:
        model = SentenceEmbedder(embedder)
        card = record_embedding(card, model, prompts)
        return card, card["embeddings"][model.id]

    base_dir = base_model.resolve(base)
    model, tok = base_model.load(base_dir)
    mean, cents = task_centroids(model, tok, prompts)
    entry = {"centroid": mean, "centroids": cents, "centroid_base": folder_fingerprint(base_dir)}
    return card | entry, entry


def merged_centroids(cards: list[dict], base_fingerprint: str) -> dict:
    """The task centroids of an expert merged from experts with these cards: each input's clusters (its
    ``centroids``, else its ``centroid``) side by side, so a task-level router finds the merged expert for
    a prompt of any of its tasks, and their mean as ``centroid``. Only what every input recorded on the
    merged expert's base (``base_fingerprint``; for sentence embedders, with one model) is carried; else
    nothing, and ``expert embed`` records it."""
    out: dict = {}

    def clusters(entry: dict) -> list[list[float]] | None:
        return entry.get("centroids") or ([entry["centroid"]] if entry.get("centroid") else None)

    if cards and all((c.get("centroid_base") or c.get("base_fingerprint")) == base_fingerprint for c in cards):
        parts = [clusters(c) for c in cards]
        if all(parts):
            cents = [row for p in parts for row in p]
            out = {"centroids": cents, "centroid": _mean(cents)}
    common = set.intersection(*(set((c.get("embeddings") or {})) for c in cards)) if cards else set()
    embeddings = {}
    for key in sorted(common):
        parts = [clusters(c["embeddings"][key]) for c in cards]
        if all(parts):
            cents = [row for p in parts for row in p]
            embeddings[key] = {"model": cards[0]["embeddings"][key].get("model"), "centroid": _mean(cents), "centroids": cents}
    if embeddings:
        out["embeddings"] = embeddings
    return out


def _mean(rows: list[list[float]]) -> list[float]:
    return [round(float(v), 5) for v in torch.tensor(rows).mean(0)]
