"""RegMean (Jin et al. 2023): per linear layer, the weight that best reproduces every model's outputs
on its own inputs, W = (Σ wᵢ Gᵢ)⁻¹ Σ wᵢ Gᵢ Wᵢ in the input space, with Gᵢ = XᵢᵀXᵢ the Gram matrix
of the layer's inputs on model i's data (``engine/stats.py``).

It is the least-squares merge: min_W Σ wᵢ ‖Xᵢ W − Xᵢ Wᵢ‖² has exactly this solution. ``alpha`` scales
the Gram matrices' off-diagonal entries (1: the exact solution; 0: a per-input-feature weighted
average), which the paper finds helps when the data are few. A small ridge toward the plain
average (``ridge`` times the Grams' mean diagonal) keeps input directions no model's data reached
at the average instead of at an arbitrary solution. Tensors that are not linear weights (norms,
biases, embeddings, a tied head) are averaged with the weights.
"""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.methods.registry import Method, Param, data_params, register


def regmean(base, tensors: list[torch.Tensor], weight: list[float], stats: list[torch.Tensor | None],
            stats_scale: list[float] | None = None, alpha: float = 0.6, ridge: float = 1e-6,
            layout: str | None = "out_in") -> torch.Tensor:
    total = sum(weight)
    if total <= 0:
        raise MoergeError(f"regmean: the weights sum to {total:g}; give at least one model a positive weight")
    average = sum(t * (w / total) for t, w in zip(tensors, weight))
    if any(g is None for g in stats) or tensors[0].dim() != 2:
        return average
    grams = []
    for g, w in zip(stats, weight):
        g = g.to(tensors[0].dtype)
        if alpha != 1.0:
            g = g * alpha + torch.diag_embed(g.diagonal()) * (1 - alpha)
        grams.append(g * w)
    in_out = layout == "in_out"  # GPT-2's Conv1D stores W as (in, out); nn.Linear as (out, in)
    ws = [t if in_out else t.T for t in tensors]  # (in, out)
    avg = average if in_out else average.T
    lhs = sum(grams)
    lam = ridge * float(lhs.diagonal().mean().clamp_min(1e-12))
    rhs = sum(g @ w for g, w in zip(grams, ws)) + lam * avg
    lhs = lhs + lam * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    out = torch.linalg.solve(lhs, rhs)
    return out if in_out else out.T.contiguous()


register(Method(
    "regmean", regmean,
    params=(*data_params("Gram matrices"),
            Param("alpha", float, 0.6, low=0.0, high=1.0, help="scale of the Gram matrices' off-diagonal entries"),
            Param("ridge", float, 1e-6, low=0.0, help="pull toward the average, times the mean diagonal")),
    min_inputs=1, pretty="RegMean", reference="https://arxiv.org/abs/2212.09849", stats="gram",
    notes="data-aware: computes each model's per-layer input Gram matrices on its data before merging (cached)",
))
