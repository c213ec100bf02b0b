"""Linear averaging, the model soup (Wortsman et al. 2022): sum of w_i * theta_i, over sum w_i."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.methods.registry import Method, Param, register


def linear(base, tensors: list[torch.Tensor], weight: list[float], normalize: bool = True) -> torch.Tensor:
    out = tensors[0].mul_(weight[0])
    for t, w in zip(tensors[1:], weight[1:]):
        out.add_(t, alpha=w)
    if normalize:
        total = sum(weight)
        if abs(total) < 1e-12:
            raise MoergeError("linear: the weights sum to zero, so they cannot be normalised; set normalize: false")
        out.div_(total)
    return out


register(Method(
    "linear", linear,
    params=(Param("weight", float, per_input=True), Param("normalize", bool, True)),
    pretty="Linear (model soup)", reference="https://arxiv.org/abs/2203.05482", blockwise=True,
))
