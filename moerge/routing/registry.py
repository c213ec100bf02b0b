"""One registry of routers. A router turns inputs into expert weights, at one of two levels:

- ``example``: ``example_weights(routed, prompts, input_ids, attention_mask) -> (batch, E)``, once per
  generate call (task-level routing: centroid, oracle, uniform);
- ``token``: ``token_weights(module, x, scores) -> (batch, tokens, E)`` inside every adapted layer
  (Arrow, PHATGOOSE). A token router whose raw scores are a linear map of ``x`` returns that map from
  ``score_map``; the runtime then computes ``scores = x @ map`` in the same matrix product as the
  experts' down-projections and passes them in (``None`` when it did not).

``fit(routed)`` precomputes what the router needs from the experts (prototypes, centroids) once. A
``few_shot`` router (LoraHub) is given a handful of a task's examples by ``adapt`` before that task.
A new router is one file in ``routers/`` that calls ``register``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch

from moerge.errors import MoergeError


class Router(ABC):
    """What every router has; subclass ``ExampleRouter`` or ``TokenRouter``, not this."""

    name: str = ""
    level: Literal["example", "token"]
    help: str = ""
    few_shot: bool = False  # needs ``adapt`` with a few labelled examples of each task
    compose: str = "deltas"  # how the experts combine: Σ w_e ΔW_e, or "factors" (LoraHub's Σ w B · Σ w A)

    def __init__(self, top_k: int | None = None, temperature: float = 1.0):
        if top_k is not None and top_k < 1:
            raise MoergeError(f"--top-k {top_k}: a router keeps at least one expert (omit it to keep them all where allowed)")
        if not temperature > 0:
            raise MoergeError(f"--temperature {temperature}: must be positive")
        self.top_k = top_k
        self.temperature = temperature

    def fit(self, routed) -> None:
        """Precompute from the experts (prototypes, centroids); nothing by default."""

    def adapt(self, routed, examples: list) -> None:
        """Fit to a new task from a few of its examples (few-shot routers override this)."""
        raise MoergeError(f"router {self.name!r} takes no examples; only few-shot routers (lorahub) adapt to a task")


class ExampleRouter(Router):
    level = "example"

    @abstractmethod
    def example_weights(self, routed, prompts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, E) weights, once per generate call."""


class TokenRouter(Router):
    level = "token"

    def to(self, device: torch.device) -> "TokenRouter":
        """Move what ``fit`` computed (tensors, and dicts or lists of them) to the model's device: a
        token router runs in every adapted layer at every step, so nothing it reads may sit elsewhere."""
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            if isinstance(v, list):
                return [move(x) for x in v]
            return v

        for k, v in list(vars(self).items()):
            setattr(self, k, move(v))
        return self

    def score_map(self, module: str) -> torch.Tensor | None:
        """An (in, P) matrix M whose product x @ M the router needs at ``module``, or None."""
        return None

    @abstractmethod
    def token_weights(self, module: str, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, tokens, E) weights inside layer ``module`` from its input ``x`` (and x @ score_map)."""


def absent_mask(present: list[bool]) -> torch.Tensor | None:
    """Which experts have nothing at a module (a token router must not pick them); None if all do."""
    return None if all(present) else ~torch.tensor(present)


def top_k_softmax(scores: torch.Tensor, k: int | None, temperature: float = 1.0,
                  absent: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the k best scores of the last dimension; the others, and ``absent`` experts, get 0."""
    if absent is not None:
        scores = scores.masked_fill(absent.to(scores.device), float("-inf"))
    if temperature != 1.0:
        scores = scores / temperature
    if k is None or k >= scores.shape[-1]:
        return torch.softmax(scores, dim=-1)
    values, index = scores.topk(k, dim=-1)
    return torch.zeros_like(scores).scatter_(-1, index, torch.softmax(values, dim=-1))


_ROUTERS: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
    if cls.name in _ROUTERS:
        raise ValueError(f"router {cls.name!r} is registered twice")
    _ROUTERS[cls.name] = cls
    return cls


def names() -> list[str]:
    _load()
    return sorted(_ROUTERS)


def get(name: str) -> type[Router]:
    _load()
    try:
        return _ROUTERS[name]
    except KeyError:
        raise MoergeError(f"unknown router {name!r}; known: {', '.join(names())}") from None


def _load() -> None:
    from moerge.routing.routers import (  # noqa: F401  (importing registers)
        arrow,
        centroid,
        lorahub,
        oracle,
        phatgoose,
        smear,
    )
