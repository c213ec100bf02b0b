"""Task-level routing by task embeddings: each expert's card carries centroids of its training
prompts' embeddings (mean-pooled final hidden states of the base, or a sentence-embedding model's):
k-means centroids, since a task's prompts form several clusters (one per phrasing), else their single
mean. Routing needs no access to the expert's data: an input's score for an expert is its best cosine
to that expert's centroids, and the top k scores go through a softmax with a temperature."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.experts.embed import SentenceEmbedder
from moerge.library.store import library_origin
from moerge.routing.registry import ExampleRouter, register, top_k_softmax


def _no_centroids(card: dict, embedder: str | None) -> str:
    """What to run when an expert's card lacks task centroids: no retraining, only its task's prompts."""
    from pathlib import Path

    name = card.get("name", "?")
    emb = f" --embedder {embedder}" if embedder else ""
    what = f"no centroids for the embedder {embedder}" if embedder else "no task centroids"
    origin = library_origin(card)
    if origin:
        lib_name, src = origin
        export = f"`moerge library export {name} DIR`, then " if src == "DIR" else ""
        return (f"expert {name} has {what} in its library card; re-add it with its task's prompts: {export}`moerge library add {src} "
                f"--name {lib_name} --prompts FILE{emb}`, or `moerge expert embed {src} --prompts FILE{emb}` then "
                f"`moerge library add {src} --name {lib_name}`")
    folder = Path(card["gates_path"]).parent if card.get("gates_path") else "EXPERT_DIR"
    return (f"expert {name} has {what}; record them with `moerge expert embed {folder}{emb}` (add --prompts FILE, its "
            "task's prompts, if it has no expert.json naming its training data); no retraining needed")


@register
class CentroidRouter(ExampleRouter):
    name = "centroid"
    help = "task embeddings: cosine to each expert's training-prompt centroid, top-k softmax"

    def __init__(self, top_k: int | None = 1, temperature: float = 0.05, embedder: str | None = None):
        super().__init__(top_k, temperature)
        self.embedder_name = embedder

    def fit(self, routed) -> None:
        self.embedder = SentenceEmbedder(self.embedder_name) if self.embedder_name else None
        self.centroids = []
        for card in routed.cards:
            source = (card or {}).get("embeddings", {}).get(self.embedder.id) if self.embedder else card
            c = (source.get("centroids") or ([source["centroid"]] if source.get("centroid") else None)) if source else None
            if not c:
                raise MoergeError(_no_centroids(card or {}, self.embedder.name if self.embedder else None))
            self.centroids.append(torch.nn.functional.normalize(torch.tensor(c, dtype=torch.float32), dim=-1))

    def example_weights(self, routed, prompts, input_ids, attention_mask) -> torch.Tensor:
        emb = self.embedder(prompts) if self.embedder else routed.embed(input_ids, attention_mask)
        emb = torch.nn.functional.normalize(emb.float().cpu(), dim=-1)  # once per call: routers score on the CPU
        scores = torch.stack([(emb @ c.T).max(dim=1).values for c in self.centroids], dim=1)
        return top_k_softmax(scores, self.top_k, self.temperature)
