"""A bank of LoRA experts inside a transformers model, mixed per example or per token in one pass.

``attach`` wraps each targeted ``nn.Linear`` in a ``MixtureLinear`` holding every expert's factors,
stacked once and zero-padded to the largest rank (an expert that does not touch a module has zero
factors there). Its forward adds ``Σ_e w_e · B_e A_e x`` for the whole batch with two plain matrix
products over the concatenated factors, never a Python loop over experts or examples:

    h = x @ A_cat                    # (b, t, E·r): every expert's down-projection at once
    y = (h ⊙ w per expert) @ B_cat   # weighted, up-projected, summed over experts

Weights come from a shared ``RoutingState``: per example ``(batch, E)`` (task-level routers: set once
before ``generate``, so they hold for every generated token and work with the KV cache), or per token,
computed inside each layer from the layer's own input by a ``TokenRouter`` (Arrow, PHATGOOSE). A
token router's scores are a linear map of the input (prototypes, gates): ``fuse`` appends that map's
columns to ``A_cat``, so one matrix product yields both the experts' down-projections and the scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from moerge.errors import MoergeError
from moerge.experts.kinds import LowRank


@dataclass
class RoutingState:
    """What the mixture layers read at each forward."""

    example_weights: torch.Tensor | None = None  # (batch, E)
    # (module, x, fused scores or None) -> (b, t, E)
    token_router: "Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor] | None" = None
    usage: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> summed weights (E,), for reports
    record: bool = False


class MixtureLinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, a: torch.Tensor, b: torch.Tensor, state: RoutingState):
        super().__init__()
        self.base = base
        self.name = name
        self.register_buffer("a", a, persistent=False)  # (E, r, in)
        self.register_buffer("b", b, persistent=False)  # (E, out, r), scales folded in
        e, r, i = a.shape
        self.register_buffer("a_cat", a.reshape(e * r, i).T.contiguous(), persistent=False)  # (in, E·r)
        self.register_buffer("b_cat", b.permute(0, 2, 1).reshape(e * r, -1).contiguous(), persistent=False)  # (E·r, out)
        self.state = state
        self.a_fused: torch.Tensor | None = None  # (in, E·r + P): A_cat with a token router's score map

    def fuse(self, scores_map: torch.Tensor | None) -> None:
        """Append a token router's (in, P) score map to A_cat (None: route from x separately)."""
        self.a_fused = None if scores_map is None else torch.cat([self.a_cat, scores_map.to(self.a_cat.dtype)], 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        st = self.state
        e, r = self.a.shape[0], self.a.shape[1]
        if st.token_router is not None and self.a_fused is not None:
            z = x @ self.a_fused.to(x.dtype)
            h, w = z[..., : e * r], st.token_router(self.name, x, z[..., e * r:])  # (b, t, E)
        elif st.token_router is not None:
            h, w = x @ self.a_cat.to(x.dtype), st.token_router(self.name, x, None)
        elif st.example_weights is not None:
            h, w = x @ self.a_cat.to(x.dtype), st.example_weights[:, None, :].to(x.dtype)  # (b, 1, E)
        else:
            return y
        if st.record:
            st.usage[self.name] = st.usage.get(self.name, 0) + w.detach().reshape(-1, w.shape[-1]).sum(0)
        h = h.unflatten(-1, (e, r)) * w.unsqueeze(-1)
        # y is the base layer's fresh output: accumulate into it in place (one fused multiply-add)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, e * r), self.b_cat.to(x.dtype))
        return y


def stack_experts(experts: list, module_names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: (A (E, r, in), B (E, out, r)) with each expert's scale folded into B."""
    out = {}
    for module in module_names:
        target = module + ".weight"
        ups = [e.updates.get(target) for e in experts]
        present = [u for u in ups if u is not None]
        if not present:
            continue
        for e, u in zip(experts, ups):
            if u is not None and (type(u) is not LowRank or u.transpose):
                raise MoergeError(f"expert {getattr(e, 'path', '?')}: a {e.kind} update on {module}; the mixture runtime "
                                  "routes plain LoRA experts on linear layers (merge DoRA/(IA)3 experts instead)")
        r = max(u.rank for u in present)
        out_f, in_f = present[0].b.shape[0], present[0].a.shape[1]
        a = torch.zeros(len(experts), r, in_f)
        b = torch.zeros(len(experts), out_f, r)
        for i, u in enumerate(ups):
            if u is not None:
                a[i, : u.rank] = u.a.float()
                b[i, :, : u.rank] = u.b.float() * u.scale
        out[module] = (a, b)
    return out


def attach(model: nn.Module, experts: list, state: RoutingState) -> dict[str, MixtureLinear]:
    """Wrap every linear layer that some expert adapts; returns the wrappers by module name."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = sorted({t[: -len(".weight")] for e in experts for t in e.updates})
    missing = [t for t in targets if t not in linears]
    if missing:
        raise MoergeError(f"the experts adapt {missing[0]!r}, which is not a linear layer of this model")
    wrapped = {}
    for module, (a, b) in stack_experts(experts, targets).items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MixtureLinear(linears[module], module, a, b, state)
        setattr(parent, child, layer)
        wrapped[module] = layer
    return wrapped
