"""A bank of experts inside a transformers model, mixed per example or per token in one pass.

``attach`` wraps each targeted ``nn.Linear`` in a ``MixtureLinear`` holding every expert's parameters
for it, stacked once. With routing weights w (per example or per token) it computes exactly the output
of the weights ``W + Σ_e w_e ΔW_e``, where ΔW_e is what expert e's merge would add to W, without
forming any of them and without a Python loop over experts or examples:

- LoRA: ΔW_e x = B_e A_e x. The factors are concatenated (zero-padded to the largest rank), so

      h = x @ A_cat                    # (b, t, E·r): every expert's down-projection at once
      y += (h ⊙ w per expert) @ B_cat  # weighted, up-projected, summed over experts

- DoRA: W' = m ⊙ (W + BA) / ‖W + BA‖ (row norms), so ΔW_e x = (c_e − 1) ⊙ Wx + c_e ⊙ B_e A_e x with the
  constant c_e = m_e / ‖W + B_e A_e‖: c_e is folded into B_e and (c_e − 1) becomes an output scaling;
- (IA)³: ΔW_e x = (l_e − 1) ⊙ Wx (output scaling; the bias too) or W((l_e − 1) ⊙ x) (feed-forward input
  scaling): y = (1 + w·S_out) ⊙ Wx, or W((1 + w·S_in) ⊙ x).

So SMEAR's "average the experts' parameters per example" and every example-level router work for all
three kinds (for several kinds on one module it is the task-arithmetic average of their deltas).
LoraHub composes the factors instead, (Σ w_e B_e)(Σ w_e A_e) with cross terms (``compose="factors"``):
the weighted down-projections are summed over experts before each B_e takes them (ranks zero-padded).

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
from moerge.experts.kinds import Dora, LowRank, Scaling
from moerge.lm import device as devices


@dataclass
class RoutingState:
    """What the mixture layers read at each forward."""

    example_weights: torch.Tensor | None = None  # (batch, E)
    # (module, x, fused scores or None) -> (b, t, E)
    token_router: "Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor] | None" = None
    # "deltas": W + Σ w_e B_e A_e (every router); "factors": W + (Σ w_e B_e)(Σ w_e A_e), LoraHub's composition
    compose: str = "deltas"
    usage: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> summed weights (E,), for reports
    record: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the model's: where weights are put


@dataclass
class Bank:
    """Every expert's parameters for one linear layer (None: no expert has that kind there)."""

    a: torch.Tensor | None = None  # (E, r, in) low-rank down-projections
    b: torch.Tensor | None = None  # (E, out, r) up-projections, LoRA scale and DoRA's c_e folded in
    s_out: torch.Tensor | None = None  # (E, out) output scalings minus 1, on Wx ((IA)3, DoRA)
    s_bias: torch.Tensor | None = None  # (E, out) scalings minus 1 of the bias ((IA)3 only)
    s_in: torch.Tensor | None = None  # (E, in) feed-forward input scalings minus 1 ((IA)3)


class MixtureLinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, bank: Bank, state: RoutingState, rows=None):
        super().__init__()
        self.base = base
        self.name = name
        self.state = state
        self.rows = rows  # the model's (batch, tokens), for a layer inside an MoE block that sees them flattened
        # the bank is made in float32 on the CPU and kept in the model's dtype where the layer computes (an offloaded
        # layer's execution device): no cast or copy per call
        dtype, device = base.weight.dtype, devices.execution_device(base)
        self.offloaded = devices.is_offloaded(base)
        for k in ("s_out", "s_bias", "s_in"):
            t = getattr(bank, k)
            self.register_buffer(k, None if t is None else devices.send(t.to(dtype), device), persistent=False)
        self.n_e, self.rank = (0, 0) if bank.a is None else bank.a.shape[:2]
        self.er = self.n_e * self.rank
        if bank.a is not None:
            e, r, i = bank.a.shape
            a_cat = bank.a.reshape(e * r, i).T.to(dtype).contiguous()  # (in, E·r)
            b_cat = bank.b.permute(0, 2, 1).reshape(e * r, -1).to(dtype).contiguous()  # (E·r, out)
            self.register_buffer("a_cat", devices.send(a_cat, device), persistent=False)
            self.register_buffer("b_cat", devices.send(b_cat, device), persistent=False)
        else:
            self.a_cat = self.b_cat = None
        self.a_fused: torch.Tensor | None = None  # (in, E·r + P): A_cat with a token router's score map
        self._in_play_for: torch.Tensor | None = None  # the example weights _in_play_cache was made for
        self._in_play_cache: tuple = (None, None, None)
        self._in_play_version = -1

    # Each expert's factors are held once, in A_cat and B_cat; the per-expert stacks are views of them.
    @property
    def a(self) -> torch.Tensor | None:
        """(E, r, in) down-projections."""
        return None if self.a_cat is None else self.a_cat.T.reshape(self.n_e, self.rank, -1)

    @property
    def b(self) -> torch.Tensor | None:
        """(E, out, r) up-projections (LoRA scale and DoRA's c_e folded in)."""
        return None if self.b_cat is None else self.b_cat.reshape(self.n_e, self.rank, -1).permute(0, 2, 1)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    def factor_pairs(self, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Expert e's (A (r, in), B (out, r)) on this layer's input: what the token routers read
        (one pair here; an MoE layer gives one per base expert)."""
        return [] if self.a_cat is None else [(self.a[e].float(), self.b[e].float())]

    def fuse(self, scores_map: torch.Tensor | None) -> None:
        """Append a token router's (in, P) score map to A_cat (None: route from x separately). A_cat
        then becomes a view of the fused matrix, so the factors are still stored once."""
        if scores_map is None or self.a_cat is None:
            self.a_fused = None
        else:
            self.a_fused = torch.cat([self.a_cat, scores_map.to(self.a_cat.dtype)], 1).contiguous()
            self.a_cat = self.a_fused[:, : self.er]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.token_router is None and st.example_weights is None:
            return self.base(x)
        if x.dim() == 2:  # tokens flattened by an MoE block (a shared expert): back into rows, and out again
            b_t = self.rows.split(x.shape[0]) if self.rows is not None else (1, x.shape[0])
            return self.forward(x.view(*b_t, -1)).view(x.shape[0], -1)
        hw, w, b = self._mix(x)
        if st.record:
            st.usage[self.name] = st.usage.get(self.name, 0) + w.detach().reshape(-1, w.shape[-1]).sum(0)
        if self.offloaded:  # the layer's weights copied in once for both terms (accelerate's offload)
            with devices.weights_in(self.base):
                y = self._scaled_base(x, w)
        else:
            y = self._scaled_base(x, w)
        if hw is not None and b.shape[0]:  # y is a fresh tensor: accumulate into it in place (one fused multiply-add)
            y.view(-1, y.shape[-1]).addmm_(hw.reshape(-1, b.shape[0]), _as(b, x))
        return y

    def _mix(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(the down-projections of the experts in play weighted per expert (b, t, E', r), or None; the
        weights (b, t, E); the up-projections of the experts in play (E'·r, out))."""
        st, h, a, b, cols = self.state, None, self.a_cat, self.b_cat, None
        if st.token_router is not None and self.a_fused is not None:
            z = x @ _as(self.a_fused, x)
            h, w = z[..., : self.er], st.token_router(self.name, x, z[..., self.er:])  # (b, t, E)
        elif st.token_router is not None:
            w = st.token_router(self.name, x, None)
        else:
            w = _as(st.example_weights, x)[:, None, :]  # (b, 1, E)
            if a is not None:
                a, b, cols = self._in_play(st.example_weights)
        if a is None:
            return None, w, None
        if h is None:
            h = x @ _as(a, x)
        wp = w if cols is None else w[..., cols]
        hw = h.unflatten(-1, (wp.shape[-1], self.rank)) * wp.unsqueeze(-1)  # (b, t, E', r): w_e A_e x
        if st.compose == "factors":  # every expert's B_e gets the composed down-projection Σ_j w_j A_j x
            hw = hw.sum(-2, keepdim=True) * wp.unsqueeze(-1)
        return hw, w, b

    def _in_play(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A, B, expert indices) of the experts some example gives weight to, when that is not all of
        them: an example-level router holds one weights tensor through a whole generate call, so the
        subset is gathered once per call, and a batch routed to one expert of a hundred costs one."""
        if self._in_play_for is not weights or self._in_play_version != weights._version:  # changed in place too
            cols = (weights != 0).any(0).nonzero().flatten()
            if len(cols) == self.n_e:
                self._in_play_cache = (self.a_cat, self.b_cat, None)
            else:
                (n_in, n_out), k = (self.a_cat.shape[0], self.b_cat.shape[1]), len(cols) * self.rank  # k may be 0
                a = self.a.index_select(0, cols).reshape(k, n_in).T.contiguous()
                b = self.b_cat.reshape(self.n_e, self.rank, n_out).index_select(0, cols).reshape(k, n_out)
                self._in_play_cache = (a, b, cols)
            self._in_play_for, self._in_play_version = weights, weights._version
        return self._in_play_cache

    def release(self) -> None:
        """Drop the experts-in-play gather (a copy of their factors) once a call is over."""
        self._in_play_for, self._in_play_cache = None, (None, None, None)

    def _scaled_base(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Wx + bias with the experts' weighted scalings ((IA)3, DoRA) applied; a new tensor."""
        if self.s_in is not None and self.s_out is None:
            return devices.plain_call(self.base, x * (1 + w @ _as(self.s_in, x)))
        y = devices.plain_call(self.base, x)
        if self.s_out is not None:
            bias = self.base.bias
            wx = y if bias is None else y - bias
            y = y + (w @ _as(self.s_out, x)) * wx
            if self.s_bias is not None:
                y = y + (w @ _as(self.s_bias, x)) * bias
        if self.s_in is not None:  # both kinds of scaling on one layer: the input one is a separate term
            y = y + nn.functional.linear(x * (w @ _as(self.s_in, x)), self.base.weight)
        return y


def _as(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in ``x``'s dtype, on its device (no call at all when it already is: these run for every layer
    and token; a model spread over GPUs moves what it shares, the routing weights, at each GPU's layers)."""
    return t if t.dtype == x.dtype and t.device == x.device else t.to(x.device, x.dtype)


def stack_bank(experts: list, module: str, linear: nn.Linear) -> Bank | None:
    """Every expert's parameters for ``module`` (None when no expert adapts it)."""
    ups = [e.updates.get(module + ".weight") for e in experts]
    if all(u is None for u in ups):
        return None
    n, (out_f, in_f) = len(experts), linear.weight.shape
    w = None  # the layer's weight, read once (on the CPU) if some expert is DoRA
    bank = Bank()

    def put(kind: str, i: int, row: torch.Tensor) -> None:  # one expert's row of a per-expert table, made on first use
        if getattr(bank, kind) is None:
            setattr(bank, kind, torch.zeros(n, row.numel()))
        getattr(bank, kind)[i] = row.reshape(-1)

    for e, u in zip(experts, ups):
        if u is not None and (not isinstance(u, (LowRank, Scaling)) or u.transpose):
            raise MoergeError(f"expert {getattr(e, 'path', '?')}: a {e.kind} update on {module} that the mixture runtime cannot "
                              "route (it routes LoRA, DoRA and (IA)3 updates of linear layers); merge this expert instead")
    low = [(i, u) for i, u in enumerate(ups) if isinstance(u, LowRank)]
    if low:
        r = max(u.rank for _, u in low)
        bank.a, bank.b = torch.zeros(n, r, in_f), torch.zeros(n, out_f, r)
        for i, u in low:
            a, b = u.a.float(), u.b.float() * u.scale
            if isinstance(u, Dora):
                if w is None:
                    with devices.weights_in(linear):  # (an offloaded layer's weight is copied in for this)
                        w = linear.weight.detach().float().cpu()
                c = u.magnitude.float().reshape(-1) / torch.linalg.vector_norm(w + b @ a, dim=1)
                b = c[:, None] * b
                put("s_out", i, c - 1)
            bank.a[i, : u.rank], bank.b[i, :, : u.rank] = a, b
    for i, u in enumerate(ups):
        if isinstance(u, Scaling):
            v = u.vector.float()
            if v.shape[-1] == 1:  # (out, 1): scales the layer's outputs, bias included
                put("s_out", i, v - 1)
                if linear.bias is not None:
                    put("s_bias", i, v - 1)
            else:  # (1, in): scales a feed-forward layer's inputs
                put("s_in", i, v - 1)
    return bank
