"""SMEAR (Muqeeth et al. 2023): the router's probabilities average the experts' parameters per
example, and one forward runs with the merged expert. For LoRA experts the mixture runtime's
per-example weighting is exactly that average (Σ p_e B_e A_e x, tested against merged weights), so
SMEAR here is a soft router: a softmax over every expert's best task-centroid cosine, no top-k. The
paper learns its router on multitask data; without that data the centroids stand in for it."""

from __future__ import annotations

from moerge.routing.registry import register
from moerge.routing.routers.centroid import CentroidRouter


@register
class SmearRouter(CentroidRouter):
    name = "smear"
    help = "SMEAR: per-example soft average of all experts by centroid-softmax probabilities (no top-k)"

    def __init__(self, top_k: int | None = None, temperature: float = 0.02, embedder: str | None = None):
        super().__init__(top_k, temperature, embedder)
