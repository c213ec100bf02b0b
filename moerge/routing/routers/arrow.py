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


def prototype(pairs: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
    """The input direction an expert amplifies most at a layer: the top right singular vector of its
    B·A, or, on an MoE layer (one pair per base expert), of all of them stacked, [B_1A_1; B_2A_2; ...]:
    the top eigenvector of Σ_k A_kᵀ(B_kᵀB_k)A_k, an (in × in) matrix, never the stack itself.
    Zero when the expert does not adapt the layer."""
    pairs = [(a, b) for a, b in pairs if bool(a.any()) and bool(b.any())]
    if not pairs:
        return torch.zeros(width)
    if len(pairs) == 1:
        return top_right_singular_vector(*pairs[0])
    gram = sum(a.double().T @ (b.double().T @ b.double()) @ a.double() for a, b in pairs)
    return torch.linalg.eigh(gram).eigenvectors[:, -1].float()


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
            protos = [prototype(layer.factor_pairs(e), layer.in_features) for e in range(len(routed.kinds))]
            self.protos[module] = torch.stack(protos)  # (E, in)
            self.absent[module] = absent_mask([bool(p.any()) for p in protos])

    def score_map(self, module: str) -> torch.Tensor:
        return self.protos[module].T

    def token_weights(self, module: str, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        scores = (x @ self.protos[module].to(x.device, x.dtype).T if scores is None else scores).abs()
        return top_k_softmax(scores, self.top_k, self.temperature, self.absent[module])
