"""Task-level routing by task embeddings: each expert's card carries the centroid of its training
prompts' embeddings (mean-pooled final hidden states of the base), so routing needs no access to the
expert's data; an input goes to the experts whose centroids are nearest (cosine), softmax with a
temperature over the top k."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.routing.registry import Router, register, top_k_softmax


@register
class CentroidRouter(Router):
    name = "centroid"
    level = "example"
    help = "task embeddings: cosine to each expert's training-prompt centroid, top-k softmax"

    def __init__(self, top_k: int | None = 1, temperature: float = 0.05):
        super().__init__(top_k, temperature)

    def fit(self, routed) -> None:
        rows = []
        for card in routed.cards:
            c = card.get("centroid") if card else None
            if not c:
                raise MoergeError(f"expert {card.get('name', '?') if card else '?'} has no centroid in its card; "
                                  "retrain it with `moerge expert train` (which records one) to route by task embeddings")
            rows.append(torch.tensor(c, dtype=torch.float32))
        self.centroids = torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def example_weights(self, routed, prompts, input_ids, attention_mask) -> torch.Tensor:
        emb = torch.nn.functional.normalize(routed.embed(input_ids, attention_mask), dim=-1)
        return top_k_softmax(emb @ self.centroids.T, self.top_k, self.temperature)
