"""Spherical interpolation between two models: SLERP (whole tensors) and NuSLERP (task vectors,
optionally row- or column-wise)."""

from __future__ import annotations

import math

import torch

from moerge.methods.registry import Method, Param, register


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Interpolate along the great circle between the directions of two flattened tensors.

    Nearly colinear (or antipodal) pairs fall back to linear interpolation, where the spherical
    formula is numerically meaningless."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return v0.mul_(1 - t).add_(v1, alpha=t)
    theta = math.acos(dot)
    s = math.sin(theta)
    return v0.mul_(math.sin((1 - t) * theta) / s).add_(v1, alpha=math.sin(t * theta) / s)


def slerp(base: torch.Tensor, tensors: list[torch.Tensor], t: float) -> torch.Tensor:
    """t = 0 gives the base model, t = 1 the other model."""
    return slerp_vectors(t, base.clone(), tensors[0])


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
