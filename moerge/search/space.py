"""The numeric knobs of a recipe that a merge search may turn, and how a candidate sets them.

A knob is one float parameter the recipe sets to a plain number, at the top level (``parameters:``)
or on one model (``models[i].parameters``): weights, densities, ``lambda``, ``t``, ``epsilon``... Its
range is the method's own (``Param.low``/``high``: a density stays in (0, 1]); a parameter without
an upper bound (a weight) searches [0, 2 × max(1, its value)]. Gradients, filters and slices stay as
written; parameters the statistics step reads (``num_examples``) are not searched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from moerge.errors import MoergeError


@dataclass(frozen=True)
class Knob:
    path: tuple  # ("parameters", name) or ("models", i, "parameters", name)
    name: str
    value: float  # as the recipe gives it: the search starts there
    low: float
    high: float

    @property
    def label(self) -> str:
        return self.name if self.path[0] == "parameters" else f"models[{self.path[1]}].{self.name}"


def knobs(recipe: dict, method, only: list[str] | None = None) -> list[Knob]:
    """Every knob of ``recipe`` (a dict, as YAML reads it) for ``method`` (a registry Method); ``only``
    keeps those parameter names."""
    found: list[Knob] = []
    scopes = [(("parameters",), recipe.get("parameters") or {})]
    scopes += [(("models", i, "parameters"), m.get("parameters") or {}) for i, m in enumerate(recipe.get("models") or [])]
    for path, params in scopes:
        for name, value in params.items():
            p = method.param(name)
            if p is None or p.type is not float or p.for_stats or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if only and name not in only:
                continue
            low = p.low if p.low is not None else 0.0
            high = p.high if p.high is not None else 2.0 * max(1.0, abs(float(value)))
            eps = 1e-3 * (high - low)  # open ends stay open
            found.append(Knob(path + (name,), name, float(value), low + (eps if p.open_low else 0.0),
                              high - (eps if p.open_high else 0.0)))
    if only:
        unknown = sorted(set(only) - {k.name for k in found})
        if unknown:
            raise MoergeError(f"--params: the recipe sets no numeric {', '.join(unknown)} for {method.name} to search; "
                              "set it to a number (at the top level or on a model) first")
    if not found:
        raise MoergeError(f"the recipe sets no numeric parameter of {method.name} to search (weight, density, ...); "
                          "set the ones to tune to numbers first")
    return found


def apply(recipe: dict, chosen: list[Knob], values) -> dict:
    """A copy of ``recipe`` with each knob set to its value (rounded to 4 decimals: a readable recipe)."""
    out = copy.deepcopy(recipe)
    for k, v in zip(chosen, values):
        node = out
        for key in k.path[:-1]:
            node = node[key]
        node[k.path[-1]] = round(min(k.high, max(k.low, float(v))), 4)
    return out


def value_at(recipe: dict, path: tuple):
    """The value a knob's path points to in a recipe dict."""
    for key in path:
        recipe = recipe[key]
    return recipe
