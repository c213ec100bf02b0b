"""Putting a bank of experts into a model and taking it out again.

Each parameter some expert adapts gets the wrapper that can route it: a linear layer a
``MixtureLinear`` (``mixture``), an MoE layer's stacked experts a ``MixtureExperts`` and any other
matrix parameter (an MoE router's weight) a ``MixtureParam`` (``stacked``). Experts are read by the
names the loaded model gives its parameters (``Expert.in_model``), which for an MoE base differ from
the checkpoint's.
"""

from __future__ import annotations

from torch import nn

from moerge.errors import MoergeError
from moerge.experts.kinds import LowRank, Scaling, StackedLowRank
from moerge.lm.device import model_device
from moerge.routing.mixture import MixtureLinear, RoutingState, stack_bank
from moerge.routing.stacked import MixtureExperts, MixtureParam, Rows, watch_model


def _updates(expert) -> dict:
    return getattr(expert, "in_model", None) or expert.updates


def attach(model: nn.Module, experts: list, state: RoutingState) -> dict[str, nn.Module]:
    """Wrap every layer that some expert adapts; returns the wrappers by module name."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = dict(model.named_modules())
    stacked: dict[str, list[dict]] = {}  # MoE experts module -> per expert {param: StackedLowRank}
    params: dict[tuple[str, str], list] = {}  # (module, matrix parameter) -> per expert LowRank or None
    for i, e in enumerate(experts):
        for t, u in _updates(e).items():
            module, _, kind = t.rpartition(".")
            if module in linears and (kind == "weight" or (kind == "bias" and isinstance(u, Scaling))):
                continue
            owner = modules.get(module)
            if isinstance(u, StackedLowRank) and owner is not None and kind in MixtureExperts.PARAMS:
                stacked.setdefault(module, [{} for _ in experts])[i][kind] = u
            elif type(u) is LowRank and not u.transpose and owner is not None and getattr(owner, kind, None) is not None \
                    and getattr(owner, kind).dim() == 2:
                params.setdefault((module, kind), [None] * len(experts))[i] = u
            else:
                raise MoergeError(f"expert {getattr(e, 'path', '?')} changes {t!r}, which is not the weight of a linear layer of "
                                  "this model; the mixture runtime routes LoRA, DoRA and (IA)3 updates of linear layers "
                                  "and LoRA on an MoE layer's experts and router")
    wrapped: dict[str, nn.Module] = {}
    rows = Rows()
    state.device = model_device(model)
    for module in sorted({t.rpartition(".")[0] for e in experts for t in _updates(e)} & set(linears)):
        bank = stack_bank([_Proxy(e) for e in experts], module, linears[module])
        if bank is not None:
            wrapped[module] = MixtureLinear(linears[module], module, bank, state, rows)
    for module, ups in stacked.items():
        wrapped[module] = MixtureExperts(modules[module], module, ups, state, rows)
    for (module, kind), ups in params.items():
        wrapped[module] = MixtureParam(modules[module], module, kind, ups, state, rows)
    for module, layer in wrapped.items():
        parent_name, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    if wrapped:
        watch_model(model, rows)
        model.__dict__.setdefault("_moerge_rows", []).append(rows)  # the hook, removed by detach
    return wrapped


class _Proxy:
    """An expert seen through the model's names (what ``stack_bank`` reads as ``updates``)."""

    def __init__(self, expert):
        self.updates, self.kind, self.path = _updates(expert), expert.kind, getattr(expert, "path", None)


def detach(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Undo ``attach``: each wrapped module goes back in its place, and the block hooks are removed."""
    for module, layer in layers.items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    mine = {id(getattr(layer, "rows", None)) for layer in layers.values()}
    watching = model.__dict__.get("_moerge_rows", [])
    for rows in [r for r in watching if id(r) in mine]:
        rows.hook.remove()
        watching.remove(rows)
