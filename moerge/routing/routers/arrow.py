"""Arrow (Ostapenko et al. 2024): zero-shot routing per layer and per token. Each expert's prototype
at a layer is the top right singular vector of its B·A (the input direction it amplifies most); a
token's score for an expert is |<h, v_e>|, and the top k scores go through a softmax."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.routing.registry import TokenRouter, absent_mask, register, top_k_softmax


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Of B·A, through QR of the factors: O((in + out) r²), never the full matrix."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    _, _, vh = torch.linalg.svd(rb @ ra.T)
    return (vh[0] @ qa.T).float()


@register
class ArrowRouter(TokenRouter):
    name = "arrow"
    help = "Arrow: per-token |<h, top singular vector of B·A>|, top-k softmax, per layer"

    def __init__(self, top_k: int | None = 1, temperature: float = 1.0):
        super().__init__(top_k, temperature)

    def fit(self, routed) -> None:
        for kind, card in zip(routed.kinds, routed.cards):
            if kind == "ia3":
                raise MoergeError(f"expert {card.get('name', '?')} is (IA)3: Arrow routes by the singular vectors of each "
                                  "expert's B·A, which (IA)3 has none of; use an example-level router (centroid, smear, ...) or phatgoose")
        self.protos: dict[str, torch.Tensor] = {}
        self.absent: dict[str, torch.Tensor | None] = {}
        for module, layer in routed.layers.items():
            present = [bool(b.any()) and bool(a.any()) for a, b in zip(layer.a, layer.b)]
            self.protos[module] = torch.stack([top_right_singular_vector(a, b) if has else torch.zeros(a.shape[1])
                                               for a, b, has in zip(layer.a, layer.b, present)])  # (E, in)
            self.absent[module] = absent_mask(present)

    def score_map(self, module: str) -> torch.Tensor:
        return self.protos[module].T

    def token_weights(self, module: str, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        scores = (x @ self.protos[module].to(x.dtype).T if scores is None else scores).abs()
        return top_k_softmax(scores, self.top_k, self.temperature, self.absent[module])
