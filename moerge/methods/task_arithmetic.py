"""Task-vector methods: one engine, nine names (task arithmetic, TIES, DARE, breadcrumbs, DELLA).

Each method is ``base + lambda * combine(sparsify(theta_i - base) * w_i)``; the names differ only in how
deltas are sparsified and whether signs are elected (TIES' "sum" consensus). Parameter names,
defaults and edge cases follow mergekit so that existing recipes produce the same tensors.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Literal

import torch

from moerge.methods import sparsify
from moerge.methods.registry import Method, Param, register

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della"] | None


def _sparsify(kind: Sparsifier, delta, density, gamma, epsilon, rescale, generator):
    if kind is None:
        return delta
    if kind == "magnitude":
        return sparsify.magnitude(delta, density, rescale)
    if kind == "magnitude_outliers":
        return sparsify.magnitude_outliers(delta, density, gamma, rescale)
    if kind == "random":
        return sparsify.bernoulli(delta, density, rescale, generator)
    return sparsify.della_magprune(delta, density, epsilon, rescale, generator)


def sign_consensus_mask(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: per entry, the sign of the (weighted) sum wins; 0 counts as positive.
    Returns where each delta agrees with the elected sign (a zero entry never agrees)."""
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected


def task_vector_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    sparsifier: Sparsifier,
    consensus: bool,
    weight: list[float],
    density: list[float] | None = None,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,  # accepted for mergekit recipes; masks here are bool already
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    n = len(tensors)
    deltas = torch.empty((n, *base.shape), dtype=base.dtype)
    for i, t in enumerate(tensors):
        d = t.sub_(base)
        d = _sparsify(
            sparsifier, d,
            density[i] if density else 1.0, gamma[i] if gamma else 0.0, epsilon[i] if epsilon else 0.0,
            rescale, generator,
        )
        torch.mul(d, weight[i], out=deltas[i])
        del d
        tensors[i] = None  # free the input early
    w = torch.tensor(weight, dtype=base.dtype).reshape((n,) + (1,) * base.dim())
    if consensus:
        mask = sign_consensus_mask(deltas)
        mixed = deltas.mul_(mask).sum(dim=0)
        if normalize:
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed /= divisor
    else:
        mixed = deltas.sum(dim=0)
        if normalize:
            total = float(sum(weight))
            mixed /= total if abs(total) >= 1e-8 else 1.0
    if lambda_ != 1:
        mixed *= lambda_
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
    fn: Callable = partial(task_vector_merge, sparsifier=sparsifier, consensus=consensus)
    return Method(
        name, fn, params=tuple(params), base="required", random=sparsifier in ("random", "della"),
        pretty=pretty, reference=ref,
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
