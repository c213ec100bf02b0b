"""The mixture runtime on an MoE base: experts whose LoRA reaches the base's own experts.

An MoE layer (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) keeps its experts' weights as two stacked 3-D
parameters, ``gate_up_proj`` (K, 2·I, H) and ``down_proj`` (K, H, I), and chooses k of the K per
token with a router whose weight is a plain matrix used through ``F.linear``. PEFT trains LoRA on
both as parameters (``target_parameters``); moerge's experts then carry, for each of the base's K
experts, a pair of factors per stack (``StackedLowRank``), and a low-rank update of the router.

Routing moerge's experts (E of them, weights w per example or per token) through such a layer:

- ``MixtureExperts`` runs the layer's experts itself, exactly as transformers does (each base expert
  on the tokens its router sent it, gate/up split, activation, down), adding to each of the two
  products the weighted low-rank terms Σ_e w_e B_e,k A_e,k x of the moerge experts, all E at once.
  At attach it checks itself against the module it replaces; a family whose experts compute
  otherwise is refused with one line (merge such experts instead).
- ``MixtureParam`` covers a matrix parameter of any other module (the router's weight): while the
  module runs, its ``F.linear(x, weight)`` gets the same weighted low-rank term added.

Both read the routing state of the linear layers (``mixture.RoutingState``) and give the token
routers the same handles (``in_features``, ``factor_pairs``), so every router works on them. The
layers inside an MoE block see its tokens flattened (N, H), so the model tells them its input's
(batch, tokens) shape through a forward pre-hook (``watch_model``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moerge.errors import MoergeError
from moerge.experts.kinds import LowRank, StackedLowRank
from moerge.lm import device as devices
from moerge.routing.mixture import RoutingState, _as


class Rows:
    """The (batch, tokens) shape of the model's current input, shared by the wrappers: what turns a
    flattened (N, H) input back into rows, so each row gets its own weights."""

    def __init__(self):
        self.shape: tuple[int, int] | None = None
        self.hook = None

    def split(self, n: int) -> tuple[int, int]:
        """(batch, tokens) for n flattened tokens: the model's input shape, else one row."""
        return self.shape if self.shape and self.shape[0] * self.shape[1] == n else (1, n)


def watch_model(model: nn.Module, rows: Rows) -> None:
    """Record the model's input shape before each call (``rows.hook.remove()`` stops it)."""

    def hook(_module, args, kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            rows.shape = (x.shape[0], x.shape[1])

    rows.hook = model.register_forward_pre_hook(hook, with_kwargs=True)


class _Routed(nn.Module):
    """What both wrappers share: the weights per flattened token, and the usage report."""

    name: str
    state: RoutingState
    rows: Rows
    n_e: int

    def active(self) -> bool:
        return self.state.token_router is not None or self.state.example_weights is not None

    def token_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) weights for the N flattened tokens ``x`` (N, H) of the block's (batch, tokens) input."""
        st, n = self.state, x.shape[0]
        b, t = self.rows.split(n)
        if st.token_router is not None:
            w = st.token_router(self.name, x.reshape(b, t, -1), None).reshape(n, -1)
        else:
            ew = _as(st.example_weights, x)
            w = ew.repeat_interleave(n // ew.shape[0], 0) if n % ew.shape[0] == 0 else ew.expand(n, -1)
        if st.record:
            st.usage[self.name] = st.usage.get(self.name, 0) + w.detach().sum(0)
        return w

    def fuse(self, scores_map) -> None:
        """Token routers score these layers from their input directly (no fused score columns)."""

    def release(self) -> None:
        """Nothing is gathered per call here."""


def _low_rank(x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, w: torch.Tensor, rank: int, compose: str) -> torch.Tensor:
    """Σ_e w_e B_e A_e x for tokens x (n, in), factors a_cat (in, E·r), b_cat (E·r, out), weights w (n, E)."""
    h = (x @ _as(a_cat, x)).unflatten(-1, (w.shape[-1], rank)) * w.unsqueeze(-1)
    if compose == "factors":  # LoraHub: every B_e takes the composed Σ_j w_j A_j x
        h = h.sum(-2, keepdim=True) * w.unsqueeze(-1)
    return h.flatten(-2) @ _as(b_cat, x)


def _cat(pairs: list[tuple[torch.Tensor, torch.Tensor, float] | None], n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every expert's (A (r, in), B (out, r), scale) side by side, ranks zero-padded: (in, E·r), (E·r, out), r."""
    r = max((p[0].shape[0] for p in pairs if p is not None), default=0)
    a, b = torch.zeros(len(pairs), r, n_in), torch.zeros(len(pairs), n_out, r)
    for i, p in enumerate(pairs):
        if p is not None:
            a[i, : p[0].shape[0]], b[i, :, : p[0].shape[0]] = p[0].float(), p[1].float() * p[2]
    return a.reshape(-1, n_in).T.contiguous(), b.permute(0, 2, 1).reshape(-1, n_out).contiguous(), r


class MixtureExperts(_Routed):
    """An MoE layer's stacked experts with every moerge expert's LoRA on them (module docstring)."""

    PARAMS = ("gate_up_proj", "down_proj")

    def __init__(self, base: nn.Module, name: str, updates: list[dict[str, StackedLowRank]], state: RoutingState, rows: Rows):
        super().__init__()
        own = [n for n, _ in base.named_parameters(recurse=False)]
        if sorted(own) != sorted(self.PARAMS) or not callable(getattr(base, "act_fn", None)):
            raise MoergeError(f"{name}: an MoE layer with parameters {', '.join(own)}; the mixture runtime routes experts of "
                              f"layers made of {' and '.join(self.PARAMS)} (Mixtral, Qwen-MoE); merge these experts instead")
        self.base, self.name, self.state, self.rows, self.n_e = base, name, state, rows, len(updates)
        self.transposed = bool(getattr(base, "is_transposed", False))
        dtype, device = base.gate_up_proj.dtype, devices.execution_device(base)  # (an offloaded layer's: where it runs)
        self.ranks: dict[str, int] = {}
        for p in self.PARAMS:
            stack = getattr(base, p)
            k, n_out, n_in = (stack.shape[0], stack.shape[2], stack.shape[1]) if self.transposed else stack.shape
            ups = [u.get(p) for u in updates]
            if all(u is None for u in ups):
                self.register_buffer(f"{p}_a", None, persistent=False)
                self.register_buffer(f"{p}_b", None, persistent=False)
                continue
            cats = [_cat([None if u is None else (u.a[j], u.b[j], u.scale) for u in ups], n_in, n_out) for j in range(k)]
            self.ranks[p] = cats[0][2]
            a, b = torch.stack([c[0] for c in cats]).to(dtype), torch.stack([c[1] for c in cats]).to(dtype)  # (K, in, E·r), (K, E·r, out)
            self.register_buffer(f"{p}_a", devices.send(a, device), persistent=False)
            self.register_buffer(f"{p}_b", devices.send(b, device), persistent=False)
        self.in_features = base.gate_up_proj.shape[1 if self.transposed else 2]
        self._check()

    def factor_pairs(self, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Expert e's (A, B) on the layer's input, one pair per base expert (gate_up's): what Arrow's
        prototype is the top right singular vector of, stacked."""
        if self.gate_up_proj_a is None:
            return []
        r = self.ranks["gate_up_proj"]
        return [(a.T[e * r:(e + 1) * r].float(), b[e * r:(e + 1) * r].T.float())
                for a, b in zip(self.gate_up_proj_a, self.gate_up_proj_b)]

    def _linear(self, x: torch.Tensor, p: str, k: int, w: torch.Tensor | None) -> torch.Tensor:
        stack = getattr(self.base, p)[k]
        y = x @ stack if self.transposed else nn.functional.linear(x, stack)
        a = getattr(self, f"{p}_a")
        if w is not None and a is not None:
            y = y + _low_rank(x, a[k], getattr(self, f"{p}_b")[k], w, self.ranks[p], self.state.compose)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return self.base(hidden_states, top_k_index, top_k_weights)
        w = self.token_weights(hidden_states)
        with devices.weights_in(self.base):  # offloaded experts: copied in once for the whole layer
            return self._run(hidden_states, top_k_index, top_k_weights, w)

    def _run(self, hidden_states, top_k_index, top_k_weights, w: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        k_all = getattr(self.base, self.PARAMS[0]).shape[0]
        with torch.no_grad():
            hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < k_all)]).tolist()
        for k in hit:
            tok, pos = torch.where(top_k_index == k)
            x = hidden_states[tok]
            wk = None if w is None else w[tok]
            gate, up = self._linear(x, "gate_up_proj", k, wk).chunk(2, dim=-1)
            y = self._linear(self.base.act_fn(gate) * up, "down_proj", k, wk)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def _check(self) -> None:
        """The runtime's own computation of the layer equals the module's, on a few random tokens."""
        p, where = self.base.gate_up_proj, devices.execution_device(self.base)
        g = torch.Generator(device="cpu").manual_seed(0)
        k_all, top = p.shape[0], min(2, p.shape[0])
        x = torch.randn(6, self.in_features, generator=g).to(where, p.dtype)
        idx = torch.stack([torch.randperm(k_all, generator=g)[:top] for _ in range(6)]).to(where)
        wts = torch.rand(6, top, generator=g).to(where, p.dtype)
        with torch.no_grad(), devices.weights_in(self.base):
            try:
                theirs = devices.plain_call(self.base, x, idx, wts)
            except Exception as e:  # a signature this runtime does not call the same way
                raise MoergeError(f"{self.name}: the mixture runtime cannot run this family's experts "
                                  f"({type(e).__name__}: {e}); merge these experts instead") from None
            mine = self._run(x, idx, wts, None)
        tol = 1e-4 if p.dtype == torch.float32 else 2e-2
        if not torch.allclose(mine.float(), theirs.float(), rtol=tol, atol=tol * float(theirs.abs().max().clamp(min=1))):
            raise MoergeError(f"{self.name}: this family's experts compute otherwise than Mixtral's and Qwen-MoE's "
                              f"({type(self.base).__name__}); the mixture runtime cannot route LoRA on them; merge these experts instead")


class _AddLowRank(TorchFunctionMode):
    """While active: ``F.linear(x, weight)`` with this very ``weight`` gets ``extra(x)`` added."""

    def __init__(self, weight: torch.Tensor, extra):
        super().__init__()
        self.weight, self.extra, self.hit = weight, extra, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear and len(args) >= 2 and args[1] is self.weight:
            self.hit = True
            return func(*args, **kwargs) + self.extra(args[0])
        return func(*args, **kwargs)


class MixtureParam(_Routed):
    """A module whose matrix parameter ``param`` some experts adapt (an MoE router's weight)."""

    def __init__(self, base: nn.Module, name: str, param: str, updates: list[LowRank | None], state: RoutingState, rows: Rows):
        super().__init__()
        weight, where = getattr(base, param), devices.execution_device(base)
        self.base, self.param, self.name, self.state, self.rows, self.n_e = base, param, name, state, rows, len(updates)
        n_out, n_in = weight.shape
        a, b, self.rank = _cat([None if u is None else (u.a, u.b, u.scale) for u in updates], n_in, n_out)
        self.register_buffer("a_cat", devices.send(a.to(weight.dtype), where), persistent=False)
        self.register_buffer("b_cat", devices.send(b.to(weight.dtype), where), persistent=False)
        self.in_features = n_in

    def factor_pairs(self, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        r = self.rank
        return [(self.a_cat.T[e * r:(e + 1) * r].float(), self.b_cat[e * r:(e + 1) * r].T.float())]

    def forward(self, *args, **kwargs):
        if not self.active():
            return self.base(*args, **kwargs)

        def extra(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            return _low_rank(flat, self.a_cat, self.b_cat, self.token_weights(flat), self.rank, self.state.compose).reshape(
                *x.shape[:-1], -1)

        with devices.weights_in(self.base):  # (offloaded: the weight the call will read is the one copied in now)
            mode = _AddLowRank(getattr(self.base, self.param), extra)
            with mode:
                out = devices.plain_call(self.base, *args, **kwargs)
        if not mode.hit:
            raise MoergeError(f"{self.name}: does not use its {self.param} through F.linear, so the mixture runtime cannot "
                              "route a LoRA on it; merge these experts instead")
        return out
