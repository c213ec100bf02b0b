"""Task-vector methods: one engine, nine names (task arithmetic, TIES, DARE, breadcrumbs, DELLA).

Each method is ``base + lambda * combine(sparsify(theta_i - base) * w_i)``; the names differ only in how
deltas are sparsified and whether signs are elected (TIES' "sum" consensus). Parameter names,
defaults and edge cases follow mergekit so that existing recipes produce the same tensors.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch

from moerge.methods import sparsify
from moerge.methods.blocks import Blocks, PerElement
from moerge.methods.registry import Method, Param, register

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della"] | None


def sparsify_prepare(
    blocks: Blocks,
    *,
    sparsifier: Sparsifier,
    density: list[float] | None = None,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    **_,
) -> dict:
    """Each input's keep mask and L1 rescale factor, from whole-tensor magnitudes of its delta."""
    if sparsifier is None:
        return {}
    keep, scale = PerElement(), []
    for i in range(blocks.n):
        d = density[i] if density else 1.0
        if d >= 1:
            keep.append(None)
            scale.append(1.0)
            continue
        mag = blocks.magnitudes(i) if (rescale or sparsifier != "random") else None
        if sparsifier == "magnitude":
            mask = sparsify.top_k_mask(mag, d)
        elif sparsifier == "magnitude_outliers":
            mask = sparsify.outlier_mask(mag, d, gamma[i] if gamma else 0.0)
        elif sparsifier == "random":
            mask = sparsify.bernoulli_mask(blocks.numel, d, generator, blocks.device)
        else:
            mask = sparsify.della_mask(mag, blocks.shape, d, epsilon[i] if epsilon else 0.0, generator)
        keep.append(mask)
        scale.append(sparsify.l1_scale(mag, mask) if rescale else 1.0)
    return {"keep": keep, "scale": scale}


def task_vector_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    consensus: bool,
    weight: list[float],
    keep: list[torch.Tensor | None] | None = None,
    scale: list[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    **_,
) -> torch.Tensor:
    """``base + lambda * combine(w_i * s_i * mask_i * (theta_i - base))`` on aligned blocks.

    With ``consensus`` (TIES) only deltas agreeing with the elected sign (that of the sum; zero
    counts as positive) contribute, and ``normalize`` divides by the weights that did."""
    deltas = []
    for i, t in enumerate(tensors):
        d = t.sub_(base)
        if keep is not None and keep[i] is not None:
            d.mul_(keep[i].view(torch.uint8))  # (torch's bool x float kernel is several times slower)
        c = weight[i] * (scale[i] if scale else 1.0)
        if c != 1:
            d.mul_(c)
        deltas.append(d)
    if consensus:
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        # elected sign s = ±1 (+1 for a zero sum); a delta agrees when d * s > 0, so
        # max(d * s, 0) * s keeps exactly the agreeing deltas, with float kernels only
        s = torch.ones_like(total).copysign_(total)
        mixed = total.zero_()
        divisor = torch.zeros_like(base) if normalize else None
        for d, w in zip(deltas, weight):
            agreeing = d.mul_(s).clamp_min_(0)
            mixed.add_(agreeing)
            if divisor is not None:
                divisor.add_(agreeing.sign_(), alpha=w)
        mixed.mul_(s)
        if divisor is not None:
            divisor.masked_fill_(divisor.abs() < 1e-8, 1)
            mixed.div_(divisor)
    else:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
        if normalize:
            total = float(sum(weight))
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


def _family(name: str, sparsifier: Sparsifier, consensus: bool, normalize: bool, rescale: bool, pretty: str, ref: str) -> Method:
    params = [
        Param("weight", float, per_input=True, help="scale of this model's task vector"),
        Param("density", float, 1.0, per_input=True, low=0, high=1, open_low=True, help="fraction of the delta kept"),
        Param("lambda", float, 1.0, help="scale of the combined task vector"),
        Param("normalize", bool, normalize, help="divide by the sum of weights"),
        Param("rescale", bool, rescale, help="restore the delta's L1 norm after dropping"),
        Param("int8_mask", bool, False, help="accepted for mergekit compatibility; no effect"),
    ]
    if sparsifier == "magnitude_outliers":
        params.append(Param("gamma", float, 0.01, per_input=True, low=0, high=1, open_high=True, help="fraction of largest entries dropped"))
    if sparsifier == "della":
        params.append(Param("epsilon", float, 0.15, per_input=True, low=0, high=0.5, open_high=True, help="spread of keep probabilities"))
    return Method(
        name, partial(task_vector_merge, consensus=consensus), params=tuple(params), base="required",
        random=sparsifier in ("random", "della"), pretty=pretty, reference=ref,
        blockwise=True, prepare=partial(sparsify_prepare, sparsifier=sparsifier) if sparsifier else None,
    )


for _args in [
    ("task_arithmetic", None, False, False, False, "Task arithmetic", "https://arxiv.org/abs/2212.04089"),
    ("ties", "magnitude", True, True, False, "TIES", "https://arxiv.org/abs/2306.01708"),
    ("dare_ties", "random", True, False, True, "DARE + TIES", "https://arxiv.org/abs/2311.03099"),
    ("dare_linear", "random", False, False, True, "DARE (linear)", "https://arxiv.org/abs/2311.03099"),
    ("breadcrumbs", "magnitude_outliers", False, False, False, "Model breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    ("breadcrumbs_ties", "magnitude_outliers", True, False, False, "Model breadcrumbs + TIES", "https://arxiv.org/abs/2312.06795"),
    ("della", "della", True, True, True, "DELLA", "https://arxiv.org/abs/2406.11617"),
    ("della_linear", "della", False, False, True, "DELLA (linear)", "https://arxiv.org/abs/2406.11617"),
]:
    register(_family(*_args))
