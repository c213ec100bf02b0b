"""Task-level routing by task embeddings: each expert's card carries centroids of its training
prompts' embeddings (mean-pooled final hidden states of the base, or a sentence-embedding model's):
k-means centroids, since a task's prompts form several clusters (one per phrasing), else their single
mean. Routing needs no access to the expert's data: an input's score for an expert is its best cosine
to that expert's centroids, and the top k scores go through a softmax with a temperature."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.routing.registry import ExampleRouter, register, top_k_softmax


@register
class CentroidRouter(ExampleRouter):
    name = "centroid"
    help = "task embeddings: cosine to each expert's training-prompt centroid, top-k softmax"

    def __init__(self, top_k: int | None = 1, temperature: float = 0.05, embedder: str | None = None):
        super().__init__(top_k, temperature)
        self.embedder_name = embedder

    def fit(self, routed) -> None:
        from moerge.routing.embed import SentenceEmbedder

        self.embedder = SentenceEmbedder(self.embedder_name) if self.embedder_name else None
        self.centroids = []
        for card in routed.cards:
            name = card.get("name", "?") if card else "?"
            source = (card or {}).get("embeddings", {}).get(self.embedder.id) if self.embedder else card
            c = (source.get("centroids") or ([source["centroid"]] if source.get("centroid") else None)) if source else None
            if not c and self.embedder:
                raise MoergeError(f"expert {name} has no centroids for the embedder {self.embedder.name}; record them with "
                                  f"`moerge expert embed EXPERT_DIR --embedder {self.embedder.name}`")
            if not c:
                raise MoergeError(f"expert {name} has no centroid in its card; "
                                  "retrain it with `moerge expert train` (which records them) to route by task embeddings")
            self.centroids.append(torch.nn.functional.normalize(torch.tensor(c, dtype=torch.float32), dim=-1))

    def example_weights(self, routed, prompts, input_ids, attention_mask) -> torch.Tensor:
        emb = self.embedder(prompts) if self.embedder else routed.embed(input_ids, attention_mask)
        emb = torch.nn.functional.normalize(emb, dim=-1)
        scores = torch.stack([(emb @ c.T).max(dim=1).values for c in self.centroids], dim=1)
        return top_k_softmax(scores, self.top_k, self.temperature)
