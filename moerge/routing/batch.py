"""Routing one batch whose rows may each go their own way: the one function that sets the mixture
layers' routing state, for ``RoutedModel`` (one router for the whole batch) and for the server (each
request its own expert, mixture or router, in one continuous batch).

A row either mixes the experts by fixed weights (one expert, a requested mixture, or an example-level
router's weights for its prompt) or belongs to a token-level router, which weighs each of its tokens
at every adapted layer. A batch with one token router for every row hands the layers that router's
own function, so its fused scores (``MixtureLinear.fuse``) are used; otherwise each router scores its
rows and the fixed rows keep their weights.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moerge.lm import device as devices
from moerge.routing.mixture import RoutingState


def set_batch_routes(state: RoutingState, fixed: torch.Tensor | None,
                     groups: Sequence[tuple[object, torch.Tensor]] = (), usage: torch.Tensor | None = None) -> None:
    """Route the next forward passes: row i by ``fixed[i]`` (rows × experts; all zero: the base
    alone), unless it is in one of ``groups`` — (token-level router, the row indices it routes).
    ``fixed`` None: every row is in a group.
    ``usage`` (rows × experts), when given, gathers each token-routed row's weights summed over its
    tokens, at every layer (the server reports which experts served a request); keep it on the
    model's device (``state.device``), where the weights are made.
    Weights made on the CPU (by example-level routers, once per call) move to the model's device here,
    once, not in every layer."""
    if fixed is not None:
        fixed = devices.send(fixed, state.device)
    if not groups:
        state.token_router = None
        state.example_weights = fixed if fixed is not None and bool(fixed.any()) else None
        return
    if len(groups) == 1 and usage is None and fixed is None:  # one router for the whole batch
        state.example_weights, state.token_router = None, groups[0][0].token_weights
        return

    def per_token(module: str, x: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        parts = [(idx, router.token_weights(module, x.index_select(0, idx), None).float())
                 for router, idx in ((r, i.to(x.device)) for r, i in groups)]
        if fixed is None:
            w = torch.zeros(x.shape[0], x.shape[1], parts[0][1].shape[-1], device=x.device)
        else:
            w = fixed[:, None, :].to(x.device).expand(x.shape[0], x.shape[1], -1).clone()
        for idx, part in parts:
            w[idx] = part
            if usage is not None:
                usage[idx.to(usage.device)] += part.sum(1).to(usage.device)
        return w.to(x.dtype)

    state.example_weights, state.token_router = None, per_token
