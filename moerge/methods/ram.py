"""RAM and RAM+ (Reinforced Agent Merging): task-vector merges for sparse, disjoint updates.

RL fine-tuning changes few parameters, and different agents change different ones. Averaging such
task vectors divides each agent's rare changes by the number of agents, diluting exactly what made
it good; summing them lets overlapping changes pile up. RAM counts, per entry, how many models
changed it (``|theta_i - base| > epsilon``): an entry one model changed takes that change whole, an
entry several changed takes the mean of their changes, and changes at or below ``epsilon`` are
dropped (the base is kept where nobody changed anything).

RAM+ (``ramplus_tl``) also scales each model's unique changes by ``1 + r * clip(rho, 0, alpha)``,
where ``rho`` is that model's count of shared entries over its count of unique ones: a model whose
changes were mostly averaged away gets its unique ones reinforced. "tl" (tensor-local): the counts
are per tensor, as in mergekit, not over the whole model as in the paper.

Semantics follow mergekit's ``ram`` and ``ramplus_tl``. Elementwise, so blockwise; RAM+'s per-model
factors are whole-tensor counts computed in ``prepare``.
"""

from __future__ import annotations

import torch

from moerge.methods.blocks import Blocks
from moerge.methods.registry import Method, Param, register


def _changed(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each model's delta with changes of at most ``epsilon`` zeroed (in place), and how many models
    changed each entry."""
    deltas, count = [], torch.zeros_like(base)
    for t in tensors:
        d = t.sub_(base)
        changed = (d.abs() > epsilon).to(d.dtype)
        d.mul_(changed)
        count.add_(changed)
        deltas.append(d)
    return deltas, count


def ram(base: torch.Tensor, tensors: list[torch.Tensor], *, epsilon: float = 1e-5, **_) -> torch.Tensor:
    """``base + sum_i d_i / max(count, 1)``: a change only one model made is kept whole, changes
    several made are averaged over those models only."""
    deltas, count = _changed(base, tensors, epsilon)
    total = deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    return total.div_(count.clamp_min_(1)).add_(base)


def ramplus_prepare(blocks: Blocks, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5, generator=None, **_) -> dict:
    """Each model's reinforcement factor ``1 + r * clip(shared / max(unique, epsilon), 0, alpha)``,
    from its counts of entries it changed alone (unique) and with others (shared) in this tensor."""
    shared, unique = [0] * blocks.n, [0] * blocks.n
    for _, b, ts in blocks:
        changed = torch.stack([(t - b).abs_() > epsilon for t in ts])
        count = changed.sum(dim=0)
        alone, together = count == 1, count > 1
        for i in range(blocks.n):
            unique[i] += int((changed[i] & alone).sum())
            shared[i] += int((changed[i] & together).sum())
    factors = [1 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in zip(shared, unique)]
    return {"factors": factors}


def ramplus_tl(base: torch.Tensor, tensors: list[torch.Tensor], *, factors: list[float], epsilon: float = 1e-5,
               **_) -> torch.Tensor:
    """RAM with each model's unique changes scaled by its factor (shared changes are averaged as in RAM)."""
    deltas, count = _changed(base, tensors, epsilon)
    plain = deltas[0].clone()
    for d in deltas[1:]:
        plain.add_(d)
    boosted = torch.zeros_like(base)
    for d, f in zip(deltas, factors):
        boosted.add_(d, alpha=f)
    out = torch.where(count == 1, boosted, plain.div_(count.clamp_min(1)))
    return out.add_(base)


_REF = "https://arxiv.org/abs/2601.13572"
register(Method(
    "ram", ram,
    params=(Param("epsilon", float, 1e-5, low=0, help="changes of at most this magnitude are ignored"),),
    base="required", pretty="Reinforced Agent Merging", reference=_REF, blockwise=True,
))
register(Method(
    "ramplus_tl", ramplus_tl,
    params=(
        Param("r", float, 0.1, low=0, help="strength of the reinforcement of unique changes"),
        Param("alpha", float, 0.2, low=0, help="cap on the shared/unique ratio"),
        # 0 is refused: a model that changed nothing here would make the ratio 0/0 (mergekit: NaN)
        Param("epsilon", float, 1e-5, low=0, open_low=True, help="changes of at most this magnitude are ignored"),
    ),
    base="required", pretty="Reinforced Agent Merging Plus (tensor-local)", reference=_REF,
    blockwise=True, prepare=ramplus_prepare,
))
