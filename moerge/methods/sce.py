"""SCE (Select, Calculate, Erase; FuseChat, Wan et al. 2024): a task-vector merge that sets each
model's coefficient from the data instead of asking for a ``weight``.

Per tensor: *select* keeps only the ``select_topk`` fraction of positions where the task vectors
disagree most (highest variance across models), on the idea that positions every model moved alike
carry no model-specific knowledge; *calculate* weighs each model by the mean square of its (selected)
task vector, normalised over the models, so the model that changed this matrix most leads it; *erase*
drops, per entry, the deltas whose sign disagrees with the sign of their sum (TIES' election), and
the survivors are averaged with those weights.

Semantics follow mergekit's ``sce`` exactly, edge cases included: the number of selected positions
is ``int(select_topk * count of nonzero variances)`` (so with one model, whose variance is zero
everywhere, any ``select_topk < 1`` leaves the base); weights fall back to uniform when their sum is
below 1e-6; the weighted mean divides by the agreeing weights clamped to at least 1e-6. Blockwise:
the selection mask and the weights are whole-tensor statistics computed in ``prepare``.
"""

from __future__ import annotations

import torch

from moerge.methods.blocks import Blocks, PerElement
from moerge.methods.registry import Method, Param, register
from moerge.methods.sparsify import rank_range_mask


def selected_count(nonzero: int, select_topk: float) -> int:
    """``int(select_topk * nonzero)`` with the product rounded to float32, as mergekit forms it (a
    torch integer count times a Python float), so the same number of positions is kept."""
    return int(torch.tensor(float(nonzero), dtype=torch.float32) * select_topk)


def sce_prepare(blocks: Blocks, *, select_topk: float = 1.0, generator=None, **_) -> dict:
    """The variance selection mask (None: keep everything) and each model's normalised weight."""
    n, numel = blocks.n, blocks.numel
    keep = None
    if select_topk < 1:
        var = torch.empty(numel, dtype=blocks.work, device=blocks.device)
        for sl, b, ts in blocks:
            torch.var(torch.stack([t - b for t in ts]), dim=0, unbiased=False, out=var[sl])
        k = selected_count(int(torch.count_nonzero(var)), select_topk)
        # the k positions of largest variance; k never exceeds the nonzero count, so none has zero variance
        keep = rank_range_mask(var, numel - k, numel) if k > 0 else torch.zeros(numel, dtype=torch.bool, device=blocks.device)
        del var
    squares = [0.0] * n
    for sl, b, ts in blocks:
        m = None if keep is None else keep[sl].to(b.dtype)
        for i, t in enumerate(ts):
            d = t - b
            if m is not None:
                d.mul_(m)
            squares[i] += float(torch.dot(d, d))
    means = [s / numel for s in squares]
    total = sum(means)
    weights = [1.0 / n] * n if abs(total) < 1e-6 else [m / total for m in means]
    return {"keep": PerElement([keep]), "weights": weights}


def sce(base: torch.Tensor, tensors: list[torch.Tensor], *, weights: list[float], keep: list[torch.Tensor | None] | None = None,
        **_) -> torch.Tensor:
    """``base + sum_i w_i a_i d_i / max(sum_i w_i a_i, 1e-6)`` on aligned blocks, where ``d_i`` is the
    selected task vector and ``a_i`` whether its sign agrees with that of ``sum_i d_i`` (a zero sum
    elects +; a zero delta never agrees)."""
    mask = None if not keep or keep[0] is None else keep[0].to(base.dtype)
    deltas = []
    for t in tensors:
        d = t.sub_(base)
        if mask is not None:
            d.mul_(mask)
        deltas.append(d)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    s = torch.ones_like(total).copysign_(total)  # the elected sign, ±1
    num = total.zero_()
    den = torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        agreeing = d.mul_(s).clamp_min_(0)  # |d| where d agrees with s, else 0
        num.add_(agreeing, alpha=w)
        den.add_(agreeing.sign_(), alpha=w)
    return num.mul_(s).div_(den.clamp_min_(1e-6)).add_(base)


register(Method(
    "sce", sce,
    params=(
        Param("select_topk", float, 1.0, low=0, high=1,
              help="fraction of positions kept, by variance across the task vectors (1: all)"),
        Param("int8_mask", bool, False, help="accepted for mergekit compatibility; no effect"),
    ),
    base="required", pretty="SCE", reference="https://arxiv.org/abs/2408.07990",
    blockwise=True, prepare=sce_prepare,
))
