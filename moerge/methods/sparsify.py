"""Which entries of a task vector survive (TIES, DARE, breadcrumbs, DELLA), as boolean masks.

Masks are computed once per tensor from the flat magnitudes ``|theta_i - base|``; applying them is
elementwise, so the merge itself can stream in blocks. Semantics follow mergekit, which is what
users' recipes were tuned against: ``density`` is the kept fraction, exactly (``int(density * n)``
entries, at least one), and ``rescale`` restores the delta's L1 norm after dropping (mergekit's choice
for DARE and DELLA, instead of the papers' 1/p factor).

Selection by rank uses a linear-time partition (numpy's introselect) instead of a sort. Equal
magnitudes are ranked by position (a stable sort's order), so exactly the requested number is kept
even in bf16 checkpoints, where equal deltas are common.
"""

from __future__ import annotations

import numpy as np
import torch

RANDOM_BLOCK = 1 << 20  # random masks are drawn in blocks of this many entries, whatever the merge's block size


def _fill_ties(keep: np.ndarray, mag: np.ndarray, value: float, first_rank: int, start: int, stop: int) -> None:
    """Entries equal to ``value`` hold ascending ranks ``first_rank, first_rank + 1, ...`` in index
    order; mark those whose rank falls in [start, stop)."""
    idx = np.flatnonzero(mag == value)
    lo, hi = max(start, first_rank) - first_rank, min(stop, first_rank + idx.size) - first_rank
    if hi > lo:
        keep[idx[lo:hi]] = True


def rank_range_mask(mag: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries of flat ``mag`` whose ascending (stable) rank is in [start, stop).

    numpy does the work: its partition is linear time, and on CPU its comparisons run several times
    faster than torch's boolean kernels. (On a GPU the magnitudes come to the host for it, once per
    tensor, and the mask goes back: the same mask on every device, ties included.)"""
    n = mag.numel()
    start, stop = max(0, start), min(n, stop)
    if start >= stop:
        return torch.zeros(n, dtype=torch.bool, device=mag.device)
    if start == 0 and stop == n:
        return torch.ones(n, dtype=torch.bool, device=mag.device)
    arr = mag.detach().cpu().numpy()
    part = arr.copy()
    # one partition per end: numpy's multi-kth partition is several times slower
    lo = hi = None
    if start > 0:
        part.partition(start)
        lo = part[start]
    if stop < n:
        rest = part[start:]
        rest.partition(stop - 1 - start)
        hi = rest[stop - 1 - start]
    del part
    keep = np.ones(n, dtype=bool)
    if lo is not None:
        np.greater(arr, lo, out=keep)
    if hi is not None:
        keep &= arr < hi
    if lo is not None:
        _fill_ties(keep, arr, lo, np.count_nonzero(arr < lo), start, stop)
    if hi is not None and hi != lo:
        _fill_ties(keep, arr, hi, np.count_nonzero(arr < hi), start, stop)
    return torch.from_numpy(keep).to(mag.device)


def top_k_mask(mag: torch.Tensor, density: float) -> torch.Tensor:
    """TIES: keep the ``density`` fraction of largest magnitudes (at least one entry)."""
    n = mag.numel()
    k = max(1, int(density * n))
    return rank_range_mask(mag, n - k, n)


def outlier_mask(mag: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest magnitudes and the smallest ones, keeping
    ``density`` of the whole (the outlier cut shrinks when both cannot fit)."""
    n = mag.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return rank_range_mask(mag, n_bot, n_bot + target)


def bernoulli_mask(n: int, density: float, generator: torch.Generator | None,
                   device: torch.device | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``. Drawn in fixed blocks so that the mask
    of a tensor depends only on the seed, never on how the merge is split; drawn on the CPU (the
    generator's device) and sent to ``device``, so it is the same on every device."""
    keep = torch.empty(n, dtype=torch.bool)
    for s in range(0, n, RANDOM_BLOCK):
        e = min(n, s + RANDOM_BLOCK)
        torch.lt(torch.rand(e - s, generator=generator), density, out=keep[s:e])
    return keep if device is None else keep.to(device)


def della_mask(mag: torch.Tensor, shape: torch.Size, density: float, epsilon: float, generator: torch.Generator | None) -> torch.Tensor:
    """DELLA's MagPrune: per row, the keep probability rises linearly with magnitude rank over
    [density - epsilon, density + epsilon]."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"density ± epsilon must stay inside (0, 1); got density {density:g}, epsilon {epsilon:g}")
    rows = mag.reshape(1, -1) if len(shape) < 2 else mag.reshape(shape[0], -1)
    cols = rows.shape[1]
    order = rows.argsort(dim=1, stable=True)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(cols, dtype=rows.dtype, device=rows.device).expand_as(rows).contiguous())
    del order
    rank_norm = ranks.div_(cols - 1) if cols > 1 else ranks.zero_()
    probs = rank_norm.mul_(2 * epsilon).add_(density - epsilon)
    # drawn on the CPU from the tensor's seed (the generator's device), then sent back: the same on every device
    return torch.bernoulli(probs.cpu(), generator=generator).to(torch.bool).reshape(-1).to(mag.device)


def l1_scale(mag: torch.Tensor, keep: torch.Tensor, eps: float = 1e-7) -> float:
    """Factor that restores the L1 norm of a delta after masking (1 when either norm vanishes)."""
    before = float(np.sum(mag.detach().cpu().numpy(), dtype=np.float64))
    if before < eps:
        return 1.0
    after = float(torch.dot(mag, keep.to(mag.dtype)))
    return before / after if after >= eps else 1.0
