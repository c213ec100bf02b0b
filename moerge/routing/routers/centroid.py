"""Task-level routing by task embeddings: each expert's card carries centroids of its training
prompts' embeddings (mean-pooled final hidden states of the base): k-means centroids, since a task's
prompts form several clusters (one per phrasing), else their single mean. Routing needs no access to
the expert's data: an input's score for an expert is its best cosine to that expert's centroids,
and the top k scores go through a softmax with a temperature."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.routing.registry import ExampleRouter, register, top_k_softmax


@register
class CentroidRouter(ExampleRouter):
    name = "centroid"
    help = "task embeddings: cosine to each expert's training-prompt centroid, top-k softmax"

    def __init__(self, top_k: int | None = 1, temperature: float = 0.05):
        super().__init__(top_k, temperature)

    def fit(self, routed) -> None:
        self.centroids = []
        for card in routed.cards:
            c = (card.get("centroids") or ([card["centroid"]] if card.get("centroid") else None)) if card else None
            if not c:
                raise MoergeError(f"expert {card.get('name', '?') if card else '?'} has no centroid in its card; "
                                  "retrain it with `moerge expert train` (which records them) to route by task embeddings")
            self.centroids.append(torch.nn.functional.normalize(torch.tensor(c, dtype=torch.float32), dim=-1))

    def example_weights(self, routed, prompts, input_ids, attention_mask) -> torch.Tensor:
        emb = torch.nn.functional.normalize(routed.embed(input_ids, attention_mask), dim=-1)
        scores = torch.stack([(emb @ c.T).max(dim=1).values for c in self.centroids], dim=1)
        return top_k_softmax(scores, self.top_k, self.temperature)
