"""TSV-M, Task Singular Vectors merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per layer weight, each task's change τₜ = Wₜ − W₀ is cut to its top r/T singular directions
(r = min(rows, cols), T tasks), so the tasks share the layer's rank instead of fighting over it; the
kept left and right singular vectors are stacked, U = [U₁ … U_T], V = [V₁ … V_T], and made orthonormal
by their polar factors (the closest orthonormal stacks), which removes the interference between tasks
whose directions overlap; then τ = U⊥ Σ V⊥ᵀ and W = W₀ + α τ.

One task gives back that task (α = 1); tasks in orthogonal subspaces give back their sum; the order of
the tasks does not matter. Vectors, biases and token tables are averaged (``subspace``).
"""

from __future__ import annotations

import torch

from moerge.methods.registry import Method, Param, register
from moerge.methods.subspace import average, is_matrix, polar, top


def tsv(base: torch.Tensor, tensors: list[torch.Tensor], *, alpha: float = 1.0, name: str | None = None,
        layer_rank: int | None = None) -> torch.Tensor:
    """``layer_rank``: the layer's rank when ``base`` and ``tensors`` are its changes written in a smaller
    basis (LoRA experts merged in their core space, ``engine/lora_merge.py``), so each task keeps the
    share of the layer's rank it would keep in the layer itself."""
    if not is_matrix(base, name):
        return average(base, tensors)
    w0 = base.float()
    deltas = [t.float() - w0 for t in tensors]
    k = max(1, (layer_rank or min(base.shape)) // len(deltas))
    parts = [top(d, k) for d in deltas]
    u = torch.cat([p[0] for p in parts], 1)
    s = torch.cat([p[1] for p in parts])
    v = torch.cat([p[2] for p in parts], 1)
    merged = (polar(u) * s) @ polar(v).T
    return (w0 + alpha * merged).to(base.dtype)


register(Method(
    "tsv", tsv,
    params=(Param("alpha", float, 1.0, low=0.0, help="the merged change's scale (the paper tunes it on validation; 1 keeps one task as it is)"),),
    base="required", min_inputs=1, pretty="TSV-M", reference="https://arxiv.org/abs/2412.00081",
    notes="per layer: each task's top r/T singular directions, stacks orthogonalised; other tensors averaged",
    extra={"tensor_name": True, "layer_rank": True},
))
