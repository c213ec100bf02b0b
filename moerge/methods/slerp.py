"""Spherical interpolation between two models: SLERP (whole tensors) and NuSLERP (task vectors,
optionally row- or column-wise)."""

from __future__ import annotations

import math

import torch

from moerge.methods.blocks import Blocks
from moerge.methods.registry import Method, Param, register


def slerp_coefficients(t: float, aa: float, bb: float, ab: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) with slerp(v0, v1) = c0 v0 + c1 v1, from the squared norms and the inner product.

    Nearly colinear (or antipodal) pairs fall back to linear interpolation, where the spherical
    formula is numerically meaningless."""
    na, nb = math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = min(1.0, max(-1.0, ab / (na * nb)))
    if abs(dot) > dot_threshold:
        return 1 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def slerp_prepare(blocks: Blocks, *, t: float, generator=None) -> dict:
    d = blocks.dots([(-1, -1), (0, 0), (-1, 0)])
    c0, c1 = slerp_coefficients(t, d[(-1, -1)], d[(0, 0)], d[(-1, 0)])
    return {"c0": c0, "c1": c1}


def slerp(base: torch.Tensor, tensors: list[torch.Tensor], t: float, c0: float, c1: float) -> torch.Tensor:
    """t = 0 gives the base model, t = 1 the other model; blockwise once the angle is known."""
    return tensors[0].mul_(c1).add_(base, alpha=c0)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False, eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(base, tensors: list[torch.Tensor], weight: list[float], nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> torch.Tensor:
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is not None:
        return nuslerp_vectors(t, tensors[0] - base, tensors[1] - base, dim, nuslerp_flatten).add_(base)
    return nuslerp_vectors(t, tensors[0], tensors[1], dim, nuslerp_flatten)


register(Method(
    "slerp", slerp, params=(Param("t", float, low=0, high=1, help="0 = base, 1 = the other model"),),
    base="required", min_inputs=1, max_inputs=1, pretty="SLERP", reference="https://en.wikipedia.org/wiki/Slerp",
    blockwise=True, prepare=slerp_prepare,
))
register(Method(
    "nuslerp", nuslerp,
    params=(
        Param("weight", float, per_input=True),
        Param("nuslerp_row_wise", bool, False, help="interpolate columns-as-vectors along dim 0"),
        Param("nuslerp_flatten", bool, True, help="treat the whole tensor as one vector"),
    ),
    base="optional", min_inputs=2, max_inputs=2, pretty="NuSLERP",
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
))
