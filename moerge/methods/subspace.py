"""What the 2025 subspace merges share (Gargiulo et al. 2025; Marczak et al. 2025): they work on each
2-D weight's singular vectors, so they need the tensor's name to tell a layer's weight from an
embedding table, and the polar factor to make a stack of singular vectors orthonormal.

Tensors that are not a layer's weight matrix (norms, biases, the embeddings and the output head,
whose rows are tokens rather than directions) are merged by the models' average, ``W₀ + mean τₜ``,
as FusionBench does for them.
"""

from __future__ import annotations

import torch

NOT_MATRICES = ("embed", "lm_head", "wte", "wpe", "embed_out", "output.weight")


def is_matrix(t: torch.Tensor, name: str | None) -> bool:
    """A layer's weight matrix (the subspace math applies), rather than a vector or a token table."""
    return t.dim() == 2 and min(t.shape) > 1 and not (name and any(k in name for k in NOT_MATRICES))


def average(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The fallback for what is not a layer's matrix: W₀ + mean τₜ, the models' average."""
    return base + sum(t - base for t in tensors) / len(tensors)


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor of ``m`` = P S Qᵀ: P Qᵀ, the semi-orthogonal matrix closest to ``m``
    (Frobenius); ``m`` itself when its columns are already orthonormal."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def top(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets of ``t``: U (rows × k'), S (k',), V (cols × k'), k' ≤ k. Directions
    with no singular value to speak of (a change of lower rank than k) are left out: they carry nothing,
    and their arbitrary vectors would bend the other tasks' directions when the stacks are made
    orthonormal."""
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    k = min(k, int((s > s[:1].clamp(min=1e-30) * 1e-6).sum()))
    return u[:, :k], s[:k], vh[:k].T
