"""A base model with a bank of experts (``Mixture``) and a router (``RoutedModel``): what ``moerge route``
evaluates; ``moerge serve`` keeps a ``Mixture`` with several routers.

``RoutedModel`` quacks like a causal LM where the evaluator needs it (``eval``, ``generate``,
``__call__``), so the same exact-match evaluation scores base models, merges and routed models.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from moerge.errors import MoergeError, MoergeWarning
from moerge.experts.card import recorded_base
from moerge.experts.embed import mean_pooled
from moerge.experts.peft_format import load_adapter
from moerge.io.source import open_source
from moerge.library import Library, library_for
from moerge.lm import base as base_model
from moerge.lm.chat import prompt_texts
from moerge.lm.device import resolve as resolve_device
from moerge.lm.generate import encode_left_padded
from moerge.routing.attach import attach, detach
from moerge.routing.batch import set_batch_routes
from moerge.routing.mixture import RoutingState
from moerge.routing.registry import Router, get


class Mixture:
    """A base model with a bank of experts attached (``attach``) and no router of its own: what routers
    fit to (their ``routed``), shared by ``RoutedModel`` (one router) and the server (several, and a
    bank that changes as adapters load and unload)."""

    def __init__(self, model, tokenizer, experts: list, cards: list[dict]):
        if not experts:
            raise MoergeError("routing needs at least one expert")
        self.model, self.tokenizer, self.cards = model, tokenizer, cards
        self.kinds = [e.kind for e in experts]
        self.state = RoutingState()
        self.layers = attach(model, experts, self.state)
        self.prefixes = None  # a PrefixCache (the server's): base embeddings reuse the prompts' shared starts

    def detach(self) -> None:
        """Put the base's own linear layers back (the bank is dropped)."""
        detach(self.model, self.layers)
        self.layers = {}

    def eval(self):
        self.model.eval()
        return self

    @property
    def names(self) -> list[str]:
        return [c.get("name", f"expert{i}") for i, c in enumerate(self.cards)]

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Base-model prompt embeddings (routing switched off while they are computed)."""
        saved = (self.state.example_weights, self.state.token_router)
        self.state.example_weights = self.state.token_router = None
        try:
            if self.prefixes:
                from moerge.routing.prefix import embed

                return embed(self.model, self.prefixes, input_ids, attention_mask, self.tokenizer.pad_token_id or 0)
            return mean_pooled(self.model, input_ids, attention_mask)
        finally:
            self.state.example_weights, self.state.token_router = saved

    def unroute(self) -> None:
        """Routing off until the next call; the layers drop what they gathered for this call's weights."""
        self.state.example_weights = self.state.token_router = None
        for layer in self.layers.values():
            layer.release()


class RoutedModel(Mixture):
    """A mixture with one router: quacks like a causal LM where the evaluator needs it."""

    def __init__(self, model, tokenizer, experts: list, cards: list[dict], router: Router):
        super().__init__(model, tokenizer, experts, cards)
        self.router = router
        self.state.compose = router.compose
        router.fit(self)
        if router.level == "token":
            router.to(self.state.device)
            for name, layer in self.layers.items():
                layer.fuse(router.score_map(name))

    def _route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.router.level == "token":
            set_batch_routes(self.state, None, [(self.router, torch.arange(input_ids.shape[0], device=self.state.device))])
            return
        prompts = prompt_texts(self.tokenizer, input_ids, attention_mask)
        set_batch_routes(self.state, self.router.example_weights(self, prompts, input_ids, attention_mask))

    @contextlib.contextmanager
    def routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Route this batch, then switch routing off: for callers that drive the base model themselves
        (the lm-eval bridge runs lm-eval's own forward and generate on ``self.model`` inside it)."""
        self._route(input_ids, attention_mask)
        try:
            yield
        finally:
            self.unroute()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        with self.routing(input_ids, attention_mask):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        with self.routing(input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    @torch.no_grad()
    def usage(self, prompts: list[str]) -> torch.Tensor:
        """Average weight each expert receives on ``prompts`` (over examples, or tokens and layers)."""
        ids, mask = encode_left_padded(self.tokenizer, prompts)
        if self.router.level == "example":
            return self.router.example_weights(self, prompt_texts(self.tokenizer, ids, mask), ids, mask).mean(0)
        self.state.usage, self.state.record = {}, True
        try:
            self(ids, mask)
        finally:
            self.state.record = False
        total = sum(self.state.usage.values())
        return total / total.sum()


def _card(folder: Path) -> dict:
    p = folder / "expert.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def load_routed(router: str, *, experts: list[str | os.PathLike] | None = None, library: str | os.PathLike | None = None,
                base: str | os.PathLike | None = None, top_k: int | None = None, temperature: float | None = None,
                embedder: str | os.PathLike | None = None, device: str | None = None) -> RoutedModel:
    """A routed model from expert folders (on ``base``, default the built-in base) or from a library's
    latest expert versions (or the refs given in ``experts``), with the named router. ``embedder``: a
    sentence-embedding model for the task-embedding routers (centroid, smear) instead of the base.
    ``device``: where the base and the experts compute (``lm.device``: auto, cpu, cuda[:N], mps; None:
    ``$MOERGE_DEVICE``)."""
    cls = get(router)
    kwargs = {k: v for k, v in (("top_k", top_k), ("temperature", temperature)) if v is not None}
    if embedder is not None:
        import inspect

        if "embedder" not in inspect.signature(cls.__init__).parameters:
            raise MoergeError(f"router {router!r} does not embed prompts; --embedder is for centroid and smear")
        kwargs["embedder"] = str(embedder)
    loaded, cards, base_dir = gather_experts(experts, library=library, base=base)
    model, tok = base_model.load(base_dir, device=resolve_device(device))
    return RoutedModel(model, tok, loaded, cards, cls(**kwargs))


def gather_experts(experts: list[str | os.PathLike] | None = None, *, library: str | os.PathLike | None = None,
                   base: str | os.PathLike | None = None) -> tuple[list, list[dict], Path]:
    """(experts, their cards, the base folder) to route among: adapter folders on ``base``, or a library's
    latest adapters made on its latest base (or the refs given); neither: ``$MOERGE_LIBRARY``'s. Full
    fine-tunes and experts made on an older base are refused when named, and left out with a warning
    otherwise."""
    library = library_for(library, experts)
    if library is not None:

        lib = Library.open(library)
        entries = [lib.get(r) for r in experts] if experts else lib.experts(latest=True)
        full = [e.ref for e in entries if e.kind == "full"]
        if full and experts:
            raise MoergeError(f"{full[0]}: a full fine-tune; routers mix adapters (LoRA, DoRA, (IA)3), so give adapters "
                              "only (merge full fine-tunes with `moerge merge`)")
        if full:  # routing among "the library's latest experts": the adapters among them
            import warnings

            warnings.warn(f"{', '.join(full)} left out: full fine-tunes are merged, not routed", MoergeWarning, stacklevel=2)
            entries = [e for e in entries if e.kind != "full"]
        if not entries:
            raise MoergeError(f"{lib.root}: has no adapter experts to route among; add some with `moerge library add`")
        current = lib.base()
        older = [e.ref for e in entries if e.base_version != current.version]
        if older and experts:
            e = lib.get(older[0])
            raise MoergeError(f"{e.ref}: was made on base@{e.base_version}, but the library routes on its latest base "
                              f"{current.ref}; rebase it (moerge expert rebase {e.ref} --library {lib.root}) or leave it out")
        if older:  # "the library's latest experts": those made on its latest base
            import warnings

            warnings.warn(f"{', '.join(older)} left out: made on an older base than {current.ref} (moerge expert rebase "
                          "re-applies them)", MoergeWarning, stacklevel=2)
            entries = [e for e in entries if e.base_version == current.version]
            if not entries:
                raise MoergeError(f"{lib.root}: has no adapter experts made on {current.ref} to route among; rebase some "
                                  "(moerge expert rebase NAME) or add new ones")
        loaded = [lib.load(e.ref) for e in entries]
        for e, x in zip(entries, loaded):
            x.path = Path(f"library:{e.ref}")  # how the mixture names it in messages
        cards = [dict(e.card) | {"task": e.task, "name": e.ref, "gates": lib.gates(e.ref)} for e in entries]
        base_dir = current.path
    else:
        if not experts:
            raise MoergeError("give expert folders (--experts) or a library (--library, or set $MOERGE_LIBRARY to one)")
        if base is None:  # the base the experts' cards name (as `eval --adapter`), else the built-in one
            base = recorded_base(experts[0], "give it with --base")
        base_dir = base_model.resolve(base)
        src = open_source(base_dir)
        loaded = [load_adapter(Path(d), src) for d in experts]
        cards = [_card(Path(d)) | {"name": Path(d).name, "gates_path": str(Path(d) / "gates.safetensors")} for d in experts]
    return loaded, cards, base_dir
