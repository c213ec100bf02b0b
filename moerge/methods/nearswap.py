"""NearSwap: take the other model's value where it is already close to the base, keep the base where
the two differ.

Per entry the step towards the other model is ``clamp(t / |other - base|, 0, 1)``: entries within
``t`` of each other are swapped outright, farther ones move only by ``t`` (a step of absolute size at
most ``t``), so large, deliberate changes of the other model are damped while its many small
adjustments come across. ``t`` is an absolute distance in parameter units (e.g. 1e-4), not a
fraction. Semantics follow mergekit's ``nearswap`` (differences below 1e-6 count as 1e-6).
Elementwise, so blockwise.
"""

from __future__ import annotations

import torch

from moerge.methods.registry import Method, Param, register


def nearswap(base: torch.Tensor, tensors: list[torch.Tensor], *, t: float) -> torch.Tensor:
    other = tensors[0]
    step = (other - base).abs_().clamp_min_(1e-6).reciprocal_().mul_(t).clamp_(0, 1)
    return torch.lerp(base, other, step)


register(Method(
    "nearswap", nearswap,
    params=(Param("t", float, low=0, help="distance below which the other model's entry is taken whole"),),
    base="required", min_inputs=1, max_inputs=1, pretty="NearSwap",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", blockwise=True,
))
