"""Iso-C and Iso-CTS, isotropic merging (Marczak et al., ICML 2025, arXiv 2502.04959).

**Iso-C**: the task-arithmetic sum τ_TA = Σₜ τₜ = U Σ Vᵀ keeps its singular directions but has its
spectrum flattened to the mean singular value, τ = σ̄ U Vᵀ: the few directions where the tasks agree no
longer drown the rest, which are each task's own. W = W₀ + α τ. Only the directions the sum has count
(its numerical rank): experts that are LoRAs change a layer in a few directions, and flattening the
spectrum over the others would add noise of full rank.

**Iso-CTS** adds what the common subspace misses: it keeps the top k = ⌊common · r⌋ directions of τ_TA
(r: the sum's numerical rank, the layer's for full fine-tunes, the adapters' total for LoRAs),
projects each task's change off that subspace, τ̄ₜ = τₜ − U_c U_cᵀ τₜ, keeps each one's top (r − k)/T
directions, stacks common and task-specific vectors, makes the stacks orthonormal (polar factors), and
scales isotropically by the mean of all kept singular values.

One task gives back its directions at their mean singular value; the order of the tasks does not
matter. Vectors, biases and token tables are averaged (``subspace``).
"""

from __future__ import annotations

import torch

from moerge.methods.registry import Method, Param, register
from moerge.methods.subspace import average, is_matrix, polar, top


def iso_c(base: torch.Tensor, tensors: list[torch.Tensor], *, alpha: float = 1.0, name: str | None = None) -> torch.Tensor:
    if not is_matrix(base, name):
        return average(base, tensors)
    w0 = base.float()
    # the directions the change has (a sum of LoRA changes has rank ≤ Σ rᵢ: its other singular vectors
    # are arbitrary, and spreading the mean singular value over them would add noise of full rank)
    u, s, v = top(sum(t.float() - w0 for t in tensors), min(base.shape))
    return (w0 + alpha * s.mean() * (u @ v.T)).to(base.dtype)


def iso_cts(base: torch.Tensor, tensors: list[torch.Tensor], *, alpha: float = 1.0, common: float = 0.8,
            name: str | None = None) -> torch.Tensor:
    if not is_matrix(base, name):
        return average(base, tensors)
    w0 = base.float()
    deltas = [t.float() - w0 for t in tensors]
    # the rank the change has, not the layer's: a sum of LoRA changes spans only their ranks, and sizing the
    # subspaces from the layer's rank would fill the task-specific part with noise
    u_all, s_all, v_all = top(sum(deltas), min(base.shape))
    r = len(s_all)
    k = max(1, min(r, int(common * r)))
    uc, sc, vc = u_all[:, :k], s_all[:k], v_all[:, :k]
    own = (r - k) // len(deltas)
    us, ss, vs = [uc], [sc], [vc]
    if own > 0:
        for d in deltas:
            u, s, v = top(d - uc @ (uc.T @ d), own)
            us.append(u)
            ss.append(s)
            vs.append(v)
    s = torch.cat(ss)
    merged = s.mean() * (polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T)
    return (w0 + alpha * merged).to(base.dtype)


ALPHA = Param("alpha", float, 1.0, low=0.0, help="the merged change's scale (the paper tunes it on validation)")
register(Method(
    "iso_c", iso_c, params=(ALPHA,), base="required", min_inputs=1, pretty="Iso-C",
    reference="https://arxiv.org/abs/2502.04959",
    notes="per layer: the summed change's singular directions at their mean singular value; other tensors averaged",
    extra={"tensor_name": True},
))
register(Method(
    "iso_cts", iso_cts,
    params=(ALPHA, Param("common", float, 0.8, low=0.0, high=1.0, open_low=True,
                         help="share of the rank kept for the tasks' common subspace; the rest is split among the tasks")),
    base="required", min_inputs=1, pretty="Iso-CTS", reference="https://arxiv.org/abs/2502.04959",
    notes="Iso-C's common subspace plus each task's own directions outside it, orthogonalised; other tensors averaged",
    extra={"tensor_name": True},
))
