"""Passthrough: copy one input (optionally scaled); with slices this is depth up-scaling (SOLAR)."""

from __future__ import annotations

import torch

from moerge.methods.registry import Method, Param, register


def passthrough(base, tensors: list[torch.Tensor], scale: list[float | None] | None = None) -> torch.Tensor:
    value = scale[0] if scale else None
    return tensors[0] if value is None else tensors[0].mul_(value)


register(Method(
    "passthrough", passthrough,
    params=(Param("scale", float, None, per_input=True),),
    max_inputs=1, pretty="Passthrough", reference="https://arxiv.org/abs/2312.15166", blockwise=True,
))
