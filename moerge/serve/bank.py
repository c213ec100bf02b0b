"""What the server serves: one base, a bank of experts attached to it, and the routers fitted to them.

A request's ``model`` names a route: the base, an expert (``name`` or ``name@V``; a bare name is its
newest version), ``router:NAME``, or a weighted mixture given in the request. Adapters load and
unload at run time (the bank is re-attached and the routers re-fitted, between two decoding steps),
and a server on a library picks up experts added to it. A router that cannot fit the current experts
(say PHATGOOSE and an adapter without gates) stays listed with the reason and refuses requests until
the bank changes; the experts stay servable by name.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.errors import MoergeError, MoergeWarning
from moerge.library import Library, library_for
from moerge.lm import base as base_model
from moerge.lm.device import resolve as resolve_device
from moerge.lm.generate import left_pad
from moerge.routing.batch import set_batch_routes
from moerge.routing.model import Mixture, gather_experts
from moerge.routing.registry import get


class NotFound(MoergeError):
    """The request names a model, expert or router the server does not have (HTTP 404)."""


class Conflict(MoergeError):
    """The request clashes with the server's state (an adapter name taken, one in use) (HTTP 409)."""


@dataclass
class Route:
    """How one request is served: ``weights`` over expert names (empty: the base), or a router."""

    weights: dict[str, float] = field(default_factory=dict)
    router: str | None = None
    label: str = ""  # what the client asked for (echoed as the response's model)


class ExpertBank:
    def __init__(self, base_dir: Path, *, experts: list | None = None, cards: list[dict] | None = None,
                 routers: list[str] | None = None, library: str | os.PathLike | None = None, base_id: str | None = None,
                 router_options: dict | None = None, strict: bool = True, device: str | None = None):
        self.base_dir = Path(base_dir)
        # on the --device setting ($MOERGE_DEVICE; auto: a CUDA GPU when there is one)
        self.model, self.tokenizer = base_model.load(self.base_dir, device=resolve_device(device))
        self.base_id = base_id or self.base_dir.name
        self.library = library
        self.experts, self.cards = list(experts or []), list(cards or [])
        self.router_names = list(routers or [])
        self.router_options = router_options or {}
        self.routers: dict = {}
        self.router_errors: dict[str, str] = {}
        self.mixture = None
        self.prefixes = None  # the engine's PrefixCache, for the routers' base embeddings
        self._rows: list = []
        self._acc: torch.Tensor | None = None  # token-routed rows' summed weights since the last collect
        self._take_library_experts(warn=True)
        self.rebuild(strict=strict)

    # ----- the bank -----

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.cards]

    def rebuild(self, strict: bool = False) -> None:
        """Attach the current experts and fit every router to them (``strict``: a router that cannot
        fit is an error, as at start-up; else it is disabled with its reason)."""
        if self.prefixes is not None:  # keys and values computed with the old bank are stale
            self.prefixes.clear()
        if self.mixture is not None:
            self.mixture.detach()
            self.mixture = None
        self.routers, self.router_errors = {}, {}
        if self.experts:
            self.mixture = Mixture(self.model, self.tokenizer, self.experts, self.cards)
            self.mixture.prefixes = self.prefixes
        for name in self.router_names:
            cls = servable_router(name)
            if self.mixture is None:
                self.router_errors[name] = "no experts are loaded to route among"
                continue
            try:
                router = cls(**self.router_options.get(name, {}))
                router.fit(self.mixture)
                if router.level == "token":
                    router.to(self.mixture.state.device)
                self.routers[name] = router
            except MoergeError as exc:
                if strict:
                    raise
                self.router_errors[name] = str(exc)

    def use_prefixes(self, prefixes) -> None:
        """Base embeddings (task routers) reuse ``prefixes``' cached prompts of the base."""
        self.prefixes = prefixes
        if self.mixture is not None:
            self.mixture.prefixes = prefixes

    def add(self, name: str, expert, card: dict) -> None:
        if name in self.names:
            raise Conflict(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        self.experts.append(expert)
        self.cards.append(dict(card, name=name))
        try:
            self.rebuild()
        except Exception:
            self.experts.pop()
            self.cards.pop()
            self.rebuild()
            raise

    def is_base(self, model: str) -> bool:
        """Does a request's ``model`` name the base (its id, or its folder)?"""
        return model in (self.base_id, str(self.base_dir))

    def remove(self, name: str, in_use: list) -> None:
        if self.is_base(name):
            raise MoergeError(f"{name!r} is the base: it is served for as long as the server runs; only adapters unload")
        if name.startswith("router:"):
            raise MoergeError(f"{name!r} is a router: routers are chosen when the server starts (--router); only "
                              "adapters unload")
        name = self.expert_name(name)
        users = sum(1 for r in in_use if name in r.weights)
        if users:
            raise Conflict(f"adapter {name!r} is serving {users} request(s) in flight; unload it when they finish")
        i = self.names.index(name)
        del self.experts[i], self.cards[i]
        self.rebuild()

    def load_folder(self, name: str, path: str | os.PathLike) -> None:
        """A PEFT adapter folder made on this base (its card, gates and centroids come along if present)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name or ""):
            raise MoergeError(f"lora_name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)")
        if not Path(path).is_dir():
            raise MoergeError(f"lora_path {path}: no such folder on the server; give a PEFT adapter folder")
        (expert,), (card,), _ = gather_experts([path], base=self.base_dir)
        self.add(name, expert, card | {"source": str(path)})

    def refresh(self) -> list[str]:
        """Load the library's adapters (made on its latest base) that are not loaded yet; their refs."""
        refs = self._take_library_experts()
        if refs:
            self.rebuild()
        return refs

    def _take_library_experts(self, warn: bool = False) -> list[str]:
        """Append the library's latest adapters made on its latest base that are not loaded yet (``warn``:
        say which are left out, full fine-tunes and experts on an older base); their refs."""
        if self.library is None:
            return []

        lib = Library.open(self.library)
        current = lib.base()
        if current.path.resolve() != self.base_dir.resolve():
            return []  # the library moved to a new base: a restart serves it (the running base stays as it is)
        latest = lib.experts(latest=True)
        full = [e.ref for e in latest if e.kind == "full"]
        older = [e.ref for e in latest if e.kind != "full" and e.base_version != current.version]
        if warn and full:
            warnings.warn(f"{', '.join(full)} left out: full fine-tunes are merged, not served", MoergeWarning, stacklevel=2)
        if warn and older:
            warnings.warn(f"{', '.join(older)} left out: made on an older base than {current.ref} (moerge expert rebase "
                          "re-applies them)", MoergeWarning, stacklevel=2)
        skipped = set(full) | set(older)
        refs = [e.ref for e in latest if e.ref not in skipped and e.ref not in self.names]
        if refs:
            loaded, cards, _ = gather_experts(refs, library=self.library)
            self.experts += loaded
            self.cards += [c | {"source": f"library:{c['name']}"} for c in cards]
        return refs

    # ----- requests -----

    def expert_name(self, name: str) -> str:
        """The loaded expert a request means: an exact name, or a bare name's newest version."""
        if name in self.names:
            return name
        versions = [n for n in self.names if n.rpartition("@")[0] == name]
        if versions:
            return max(versions, key=lambda n: int(n.rpartition("@")[2]) if n.rpartition("@")[2].isdigit() else -1)
        raise NotFound(f"model {name!r} is not served here; GET /v1/models lists the base, the experts and the routers")

    def resolve(self, model: str, mixture: dict | None = None) -> Route:
        if mixture is not None and not self.is_base(model):
            raise MoergeError(f"mixture: send it with the base as the model ({self.base_id!r}); {model!r} would be "
                              "replaced by the mixture")
        if mixture is not None:
            if not isinstance(mixture, dict) or not mixture:
                raise MoergeError("mixture: give an object of expert name -> weight, e.g. {\"caps\": 0.5, \"reverse\": 0.5}")
            weights = {}
            for k, v in mixture.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or abs(v) == float("inf"):
                    raise MoergeError(f"mixture: the weight of {k!r} must be a finite number, not {v!r}")
                weights[self.expert_name(k)] = weights.get(self.expert_name(k), 0.0) + float(v)
            return Route(weights=weights, label=model)
        if self.is_base(model):
            return Route(label=model)
        if model.startswith("router:"):
            name = model.partition(":")[2]
            if name in self.router_errors:
                raise MoergeError(f"router {name!r} cannot route the experts loaded now: {self.router_errors[name]}")
            if name not in self.routers:
                raise NotFound(f"router {name!r} is not served here (served: {', '.join(self.router_names) or 'none'}); "
                               "start the server with --router NAME")
            return Route(router=name, label=model)
        return Route(weights={self.expert_name(model): 1.0}, label=model)

    def check(self, route: Route) -> None:
        """Still servable (its experts loaded, its router fitted)? Raises the reason otherwise."""
        for n in route.weights if route.router is None else []:
            if n not in self.names:
                raise NotFound(f"expert {n!r} was unloaded before this request started")
        if route.router is not None and route.router not in self.routers:
            raise MoergeError(f"router {route.router!r} cannot route now: {self.router_errors.get(route.router, 'not served')}")

    def assign_example_routes(self, seqs: list) -> None:
        """Rows routed by an example-level router get their weights now, once, from their prompt."""
        by_router: dict[str, list] = {}
        for s in seqs:
            if s.route.router is not None and self.routers[s.route.router].level == "example":
                by_router.setdefault(s.route.router, []).append(s)
            elif s.route.router is None:
                s.weights = dict(s.route.weights)
        for name, group in by_router.items():
            ids, mask = left_pad([s.prompt_ids for s in group], self.tokenizer.pad_token_id or 0)
            w = self.routers[name].example_weights(self.mixture, [s.prompt_text for s in group], ids, mask)
            for s, row in zip(group, w.tolist()):
                s.weights = {n: x for n, x in zip(self.names, row) if x != 0}

    def route_rows(self, rows: list) -> None:
        """Set the mixture's routing state for a batch of rows (in batch order)."""
        self.collect()
        if self.mixture is None:
            return
        st = self.mixture.state
        index = {n: i for i, n in enumerate(self.names)}
        fixed = torch.zeros(len(rows), len(self.names))  # moved once to the model's device by set_batch_routes
        token: dict[str, list[int]] = {}
        for i, s in enumerate(rows):
            if s.route.router is not None and self.routers[s.route.router].level == "token":
                token.setdefault(s.route.router, []).append(i)
            else:
                for n, w in s.weights.items():
                    fixed[i, index[n]] = w
        for layer in self.mixture.layers.values():
            layer.release()
        self._rows = rows
        groups = [(self.routers[n], torch.tensor(idx, device=st.device)) for n, idx in token.items()]
        self._acc = torch.zeros(len(rows), len(self.names), device=st.device) if token else None
        set_batch_routes(st, fixed, groups, self._acc)

    def collect(self) -> None:
        """Add what token routers gave each row since the last call to that row's tally."""
        if self._acc is not None:
            for s, acc in zip(self._rows, self._acc):
                if s.route.router is not None and self.routers.get(s.route.router) is not None \
                        and self.routers[s.route.router].level == "token":
                    s.token_usage = acc.clone() if s.token_usage is None else s.token_usage + acc
            self._acc.zero_()

    def unroute(self) -> None:
        self.collect()
        self._acc, self._rows = None, []
        if self.mixture is not None:
            self.mixture.unroute()

    def served_by(self, s) -> dict[str, float]:
        """Expert -> weight that served a request (a token router's: its mean over tokens and layers)."""
        self.collect()
        if s.token_usage is not None and float(s.token_usage.sum()) > 0:
            share = s.token_usage / s.token_usage.sum()
            return {n: round(float(x), 4) for n, x in zip(self.names, share) if x > 1e-4}
        return {n: round(float(w), 4) for n, w in s.weights.items()}

    def models(self, created: int) -> list[dict]:
        out = [{"id": self.base_id, "object": "model", "created": created, "owned_by": "moerge", "root": str(self.base_dir),
                "parent": None}]
        for c in self.cards:
            out.append({"id": c["name"], "object": "model", "created": created, "owned_by": "moerge", "parent": self.base_id,
                        "root": c.get("source") or c["name"], "task": c.get("task")})
        for n in self.router_names:
            out.append({"id": f"router:{n}", "object": "model", "created": created, "owned_by": "moerge", "parent": self.base_id,
                        "root": f"router:{n}", "available": n in self.routers,
                        **({"reason": self.router_errors[n]} if n in self.router_errors else {})})
        return out


def servable_router(name: str):
    """The router class ``name``, if a server can run it (few-shot routers need each task's examples)."""
    cls = get(name)
    if cls.few_shot:
        raise MoergeError(f"router {name!r} needs labelled examples of each task; serve a task-level router (centroid, "
                          "smear) or a token-level one (arrow, phatgoose) instead")
    return cls


def sources(*, library: str | os.PathLike | None = None, experts: list | None = None,
            base: str | os.PathLike | None = None) -> tuple[list, list[dict], Path, str]:
    """(experts, their cards, the base folder, the base's model id) a server starts from, every input
    checked: adapter folders on ``base``, or a library (whose experts the bank takes itself, as it
    does when more are added later), or the base alone (adapters can be loaded later)."""
    if library is not None and experts:
        raise MoergeError("give --library (its latest adapters are served) or --experts (adapter folders), not both")
    library = library_for(library, experts)
    if library is not None:

        current = Library.open(library).base()
        return [], [], current.path, current.ref
    loaded, cards, base_dir = gather_experts(experts, base=base) if experts else ([], [], base_model.resolve(base))
    base_model.check_model_folder(base_dir, "base")
    names = [c["name"] for c in cards]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MoergeError(f"two experts are named {dup[0]!r} (adapter folders are named after the folder); rename one")
    if base is None:  # the built-in base, or the one the experts' cards name: called as served
        builtin = Path(base_dir).resolve() == Path(base_model.resolve(None)).resolve()
        return loaded, cards, base_dir, "moerge-tiny" if builtin else Path(base_dir).name
    return loaded, cards, base_dir, Path(base_dir).name if Path(str(base)).exists() else str(base)


def open_bank(*, library: str | os.PathLike | None = None, experts: list | None = None, base: str | os.PathLike | None = None,
              routers: list[str] | None = None, router_options: dict | None = None, strict: bool = True,
              device: str | None = None) -> ExpertBank:
    """A bank from ``sources`` with the named routers fitted (``$MOERGE_LIBRARY``'s experts when given
    neither a library nor expert folders), its base on ``device`` (None: the ``--device`` setting)."""
    library = library_for(library, experts)
    loaded, cards, base_dir, base_id = sources(library=library, experts=experts, base=base)
    return ExpertBank(base_dir, experts=loaded, cards=cards, routers=routers, library=library, base_id=base_id,
                      router_options=router_options, strict=strict, device=device)
