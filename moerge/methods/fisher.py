"""Fisher-weighted averaging (Matena & Raffel 2022): θ = Σ wᵢ Fᵢ θᵢ / Σ wᵢ Fᵢ per parameter entry.

Fᵢ is model i's diagonal Fisher on examples of its own task (``engine/stats.py`` computes it before
the merge): an entry a model's task leans on weighs that model's value there more. ``floor`` is
added to every Fisher entry, so an entry no model's data touched falls back to the weighted average
instead of dividing by zero. ``normalize_fisher`` divides each model's Fisher by its mean over the
whole model first: models whose gradients are larger overall (a harder task, a longer answer) do
not outvote the others everywhere.
"""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.methods.registry import Method, Param, data_params, register


def fisher(base, tensors: list[torch.Tensor], weight: list[float], stats: list[torch.Tensor | None],
           stats_scale: list[float], floor: float = 1e-6, normalize_fisher: bool = True, layout=None) -> torch.Tensor:
    total = sum(weight)
    if total <= 0:
        raise MoergeError(f"fisher: the weights sum to {total:g}; give at least one model a positive weight")
    if any(f is None for f in stats):  # a tensor without a Fisher (none of them is a parameter): the weighted average
        return sum(t * (w / total) for t, w in zip(tensors, weight))
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for t, w, f, s in zip(tensors, weight, stats, stats_scale):
        f = f.to(t.dtype) / (s if normalize_fisher and s > 0 else 1.0)
        f = (f + floor) * w
        num.addcmul_(f, t)
        den.add_(f)
    return num.div_(den)


register(Method(
    "fisher", fisher,
    params=(*data_params("Fisher"),
            Param("floor", float, 1e-6, low=0.0, help="added to every Fisher entry"),
            Param("normalize_fisher", bool, True, help="divide each model's Fisher by its whole-model mean")),
    min_inputs=1, pretty="Fisher merging", reference="https://arxiv.org/abs/2111.09832", stats="fisher",
    notes="data-aware: computes each model's diagonal Fisher on its data before merging (cached)",
))
