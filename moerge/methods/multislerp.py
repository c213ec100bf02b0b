"""Multi-SLERP: barycentric interpolation of several tensors on the hypersphere, through the tangent
space at their weighted mean direction; norms are averaged separately."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.methods.registry import Method, Param, register


def multislerp(base, tensors: list[torch.Tensor], weight: list[float], normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    x = torch.stack([t.reshape(-1) for t in tensors])
    if base is not None:
        x -= base.reshape(-1)
    w = torch.tensor(weight, dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            out = (x[0] * w[0] + x[1] * w[1]).reshape(shape)
            return out + base if base is not None else out
        raise MoergeError("multislerp: the weighted directions cancel out (antipodal inputs); change the weights")
    mean = mean / mean_norm
    tangent = units - (units @ mean)[:, None] * mean
    step = (tangent * w[:, None]).sum(0)
    step_norm = torch.linalg.vector_norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(shape)
    return out + base if base is not None else out


register(Method(
    "multislerp", multislerp,
    params=(Param("weight", float, per_input=True), Param("normalize_weights", bool, True), Param("eps", float, 1e-8, low=0)),
    base="optional", min_inputs=1, pretty="Multi-SLERP", reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
))
