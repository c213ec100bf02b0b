"""Resolving a parameter setting for one tensor: filters by tensor name, gradients across depth.

``t`` is the tensor's relative depth within its slice (0 for the first layer and for tensors outside
the layer stack, 1 for the last layer), exactly as mergekit computes it, so gradient recipes land on
the same values.
"""

from __future__ import annotations

from typing import Any, Iterable

from moerge.engine.recipe import Condition, Parameters, Setting
from moerge.methods.registry import Param

MISSING = object()


def evaluate(setting: Setting, tensor_name: str, t: float, param: Param) -> Any:
    """The value of ``setting`` for ``tensor_name`` at depth ``t``, or MISSING if no filter matches."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return MISSING
        if all(isinstance(c, Condition) for c in setting):
            for cond in setting:
                if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                    return evaluate(cond.value, tensor_name, t, param)
            return MISSING
        values = [param.check(v) for v in setting]
        if param.type not in (int, float):
            return values[int(t * (len(values) - 1))]
        pos = t * (len(values) - 1)
        i0 = int(pos)
        i1 = min(len(values) - 1, i0 + 1)
        frac = pos - i0
        lo, hi = sorted((values[i0], values[i1]))
        # clamped: rounding must not push a value interpolated between two in-range ends out of range
        return param.check(min(hi, max(lo, (1 - frac) * values[i0] + frac * values[i1])))
    return param.check(setting)


def resolve(param: Param, scopes: Iterable[Parameters | None], tensor_name: str, t: float) -> Any:
    """First scope (highest precedence first) whose setting applies, else the default (or MISSING)."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate(scope[param.name], tensor_name, t, param)
            if value is not MISSING:
                return value
    return MISSING if param.required else param.default
