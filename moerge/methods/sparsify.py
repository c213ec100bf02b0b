"""Ways to sparsify a task vector before it is combined (TIES, DARE, breadcrumbs, DELLA).

Semantics follow mergekit, which is what users' recipes were tuned against: ``density`` is the kept
fraction, and ``rescale`` restores the delta's L1 norm after dropping (mergekit's choice for DARE and
DELLA, instead of the papers' 1/p factor). Magnitude selection uses order statistics
(``kthvalue``, linear time) instead of a full sort: the kept set is the same except among entries of
exactly equal magnitude.
"""

from __future__ import annotations

import torch


def _l1_rescale(original: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)


def _kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a flat tensor (1-based)."""
    return torch.kthvalue(mag, mag.numel() - k + 1).values


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (at least one)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mag = delta.abs().reshape(-1)
    keep = (mag >= _kth_largest(mag, k)).reshape(delta.shape)
    masked = delta * keep if rescale else delta.mul_(keep)
    return _l1_rescale(delta, masked) if rescale else masked


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest entries and the smallest ones, keeping
    ``density`` of the whole (outlier removal shrinks when both cannot fit)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    if target <= 0:
        return torch.zeros_like(delta)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    mag = delta.abs().reshape(-1)
    lo = torch.kthvalue(mag, n_bot + 1).values
    hi = torch.kthvalue(mag, n_bot + target).values
    keep = ((mag >= lo) & (mag <= hi)).reshape(delta.shape)
    masked = delta * keep if rescale else delta.mul_(keep)
    return _l1_rescale(delta, masked) if rescale else masked


def bernoulli(delta: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    masked = delta * keep if rescale else delta.mul_(keep)
    return _l1_rescale(delta, masked) if rescale else masked


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DELLA's MagPrune: per row, keep probability rises linearly with magnitude rank over
    [density - epsilon, density + epsilon]."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"density ± epsilon must stay inside (0, 1); got density {density:g}, epsilon {epsilon:g}")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    cols = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(cols, dtype=rows.dtype).expand_as(rows).contiguous())
    rank_norm = ranks / (cols - 1) if cols > 1 else torch.zeros_like(ranks)
    probs = rank_norm.mul_(2 * epsilon).add_(density - epsilon)
    keep = torch.bernoulli(probs, generator=generator).reshape(delta.shape)
    masked = delta * keep if rescale else delta.mul_(keep)
    return _l1_rescale(delta, masked) if rescale else masked
