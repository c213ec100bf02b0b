"""One registry of merge methods: a name, a pure tensor function, and the parameters it takes.

A method is a plain function ``fn(base, tensors, **params) -> tensor`` over the aligned tensors of one
parameter. ``base`` is the base model's tensor (or None), ``tensors`` the other inputs in recipe order,
already in the compute dtype (float32, or float64 when an input is float64) and owned by the call, so
a method may overwrite them. Per-input parameters arrive as lists aligned with ``tensors``; shared
ones as scalars. Random methods get a ``generator`` seeded per tensor, so results do not depend on
thread scheduling. The recipe layer resolves and range-checks parameters from the specs declared here;
methods never parse configuration.

A *data-aware* method (``stats``: Fisher, RegMean) also gets each input's statistics for the tensor,
computed from data before the merge by ``engine/stats.py``; the function itself never sees data.

A *blockwise* method's ``fn`` is elementwise once whole-tensor statistics are known: its optional
``prepare(blocks, generator=, **params) -> extras`` computes them (thresholds, masks, norms) from a
:class:`~moerge.methods.blocks.Blocks`, and ``fn(base_block, blocks, **params, **extras)`` then runs
on aligned flat blocks, so the executor never widens whole tensors to float32. Called directly, the
same two functions run on one block: the whole tensor.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any = REQUIRED
    per_input: bool = False  # one value per non-base input, else one shared value
    low: float | None = None  # inclusive unless open_low
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    help: str = ""
    for_stats: bool = False  # read by the statistics step (engine/stats.py), not passed to the method

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> Any:
        """Coerce ``value`` to this parameter's type; raise ValueError with the reason."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError("must be true or false")
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"must be a number, not {value!r}")
            try:
                value = self.type(float(value)) if self.type is int else float(value)
            except ValueError:
                raise ValueError(f"must be a number, not {value!r}") from None
            lo_bad = self.low is not None and (value <= self.low if self.open_low else value < self.low)
            hi_bad = self.high is not None and (value >= self.high if self.open_high else value > self.high)
            if lo_bad or hi_bad:
                lo = "(" if self.open_low else "["
                hi = ")" if self.open_high else "]"
                a = "-inf" if self.low is None else f"{self.low:g}"
                b = "inf" if self.high is None else f"{self.high:g}"
                raise ValueError(f"must be in {lo}{a}, {b}{hi}, got {value:g}")
            return value
        return self.type(value)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "ignored"] = "ignored"
    min_inputs: int = 1  # non-base inputs
    max_inputs: int | None = None
    random: bool = False
    pretty: str = ""
    reference: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict)
    blockwise: bool = False
    prepare: Callable[..., dict] | None = None
    # a data-aware method: the statistic it weighs each input by ("fisher" or "gram"), computed per input
    # model by engine/stats.py and passed as ``stats`` (a list aligned with ``tensors``, None where a
    # tensor has none) and ``stats_scale`` (each model's whole-model mean, for normalising)
    stats: str | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def __call__(self, base: torch.Tensor | None, tensors: list[torch.Tensor], generator=None, **params):
        """Merge whole tensors already in the compute dtype (the method may overwrite them)."""
        if self.blockwise:
            work = compute_dtype([t.dtype for t in tensors] + ([base.dtype] if base is not None else []))
            return self.stream(base, tensors, work=work, out_dtype=work, generator=generator, **params)
        kwargs = _kwargs(params)
        if self.random:
            kwargs["generator"] = generator
        return self.fn(base, tensors, **kwargs)

    def stream(self, base: torch.Tensor | None, tensors: list[torch.Tensor], *, work: torch.dtype, out_dtype: torch.dtype,
               cast: torch.dtype | None = None, block: int | None = None, generator=None, **params) -> torch.Tensor:
        """Run a blockwise method over inputs in any storage dtype, ``block`` entries at a time
        (None: one block), writing into a fresh tensor of ``out_dtype``."""
        from moerge.methods.blocks import Blocks, cut

        blocks = Blocks(base, tensors, work, cast, block)
        kwargs = _kwargs(params)
        extras = self.prepare(blocks, generator=generator, **kwargs) if self.prepare else {}
        out = torch.empty(blocks.numel, dtype=out_dtype, device=blocks.device)
        for sl, b, ts in blocks:
            out[sl].copy_(self.fn(b, ts, **kwargs, **cut(extras, sl, blocks.whole)))
        return out.reshape(blocks.shape)


def _kwargs(params: dict) -> dict:
    return {(k + "_" if keyword.iskeyword(k) else k): v for k, v in params.items()}


def data_params(statistic: str) -> tuple[Param, ...]:
    """The parameters every data-aware method takes: a share per model, each model's data, and how
    many of its examples the statistics step reads."""
    return (Param("weight", float, 1.0, per_input=True, low=0.0, help="the model's share"),
            Param("data", str, None, per_input=True, for_stats=True,
                  help="examples of the model's task: a JSONL file, built-in task name(s); default: its expert card's data"),
            Param("num_examples", int, 256, low=1, high=100_000, for_stats=True, help=f"examples per model for its {statistic}"))


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    from moerge.errors import MoergeError

    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise MoergeError(f"unknown merge_method {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


# parameters of mergekit's methods that no moerge method takes (none now): a recipe written for one
# of them is accepted with a warning, not refused as a typo
MERGEKIT_ONLY_PARAMS: frozenset[str] = frozenset()


def all_param_names() -> frozenset[str]:
    """Every parameter name some merge method takes (moerge's or mergekit's): a name outside it is a typo."""
    _load_builtins()
    return frozenset(p.name for m in _METHODS.values() for p in m.params) | MERGEKIT_ONLY_PARAMS


def _load_builtins() -> None:
    # importing the modules registers their methods
    from moerge.methods import (  # noqa: F401
        arcee_fusion,
        fisher,
        iso,
        karcher,
        linear,
        model_stock,
        multislerp,
        nearswap,
        passthrough,
        ram,
        regmean,
        sce,
        slerp,
        task_arithmetic,
        tsv,
        wudi,
    )


def compute_dtype(dtypes) -> torch.dtype:
    """Methods work in float32 (float64 if any input is float64), whatever the storage dtype."""
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32
