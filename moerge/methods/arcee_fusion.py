"""Arcee Fusion: keep only the other model's changes that stand out, leave the base elsewhere.

Each entry's importance is its change ``|other - base|`` times how much its row's softmax
distribution moved, ``KL(softmax(other_row) || softmax(base_row))`` (rows along the last axis; a
vector is one row), so a change counts more in rows whose overall profile shifted. The entries kept
are the outliers of the importance scores by Tukey's fence: at least ``median + 1.5 * IQR``. The
threshold adapts to each tensor, so no density needs tuning; typically only a few percent of the
changes pass.

Semantics follow mergekit's ``arcee_fusion``, including its quantile convention (the sorted value at
index ``floor(q * (n - 1))``) and the 1e-8 added to both softmaxes. One deliberate difference: the
quantiles are exact over the whole tensor (a linear-time partition), where mergekit estimates them
from a million entries drawn at random (unseeded) once a tensor has more, so its mask of a large
tensor changes from run to run. On tensors of at most a million entries the two agree exactly.
Whole-tensor (softmax rows and quantiles), not blockwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moerge.methods.registry import Method, register


def importance(other: torch.Tensor, base: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``|other - base|`` scaled by the KL divergence of the rows' softmaxes (other || base)."""
    p = F.softmax(other, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * kl


def tukey_threshold(scores: torch.Tensor) -> torch.Tensor:
    """``median + 1.5 * (Q3 - Q1)`` with each quantile the sorted value at ``floor(q * (n - 1))``, as a
    0-d tensor of ``scores``' dtype (the arithmetic rounds as mergekit's does)."""
    flat = scores.detach().reshape(-1).cpu().numpy()
    last = flat.size - 1
    ranks = [last // 4, last // 2, (3 * last) // 4]
    part = np.partition(flat, ranks)
    q1, median, q3 = (torch.tensor(part[r], dtype=scores.dtype, device=scores.device) for r in ranks)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    other = tensors[0]
    scores = importance(other, base)
    keep = scores >= tukey_threshold(scores)
    return base + (other - base) * keep


register(Method(
    "arcee_fusion", arcee_fusion, base="required", min_inputs=1, max_inputs=1, pretty="Arcee Fusion",
    reference="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
))
