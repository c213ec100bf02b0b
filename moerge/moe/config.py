"""mergekit-moe configs: their own schema (no merge_method; base_model + experts + gate_mode), validated
by pydantic, with every error one line naming the file, YAML line and key, as recipes' errors do.

mergekit's keys are kept as written (``base_model``, ``gate_mode``, ``experts_per_token``, ``experts``
with ``source_model``, ``positive_prompts``, ``negative_prompts``, ``noise_scale``, ``residual_scale``,
``dtype``, ``shared_experts``, ``architecture``); moerge adds ``seed`` (random gates and noise are
reproducible). Unknown keys are refused rather than ignored.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from moerge.engine.recipe import (
    _error_path,
    _line_map,
    _message,
    _ref,
    check_dtype,
    format_path,
    located,
    whole_number,
    yaml_error,
)
from moerge.errors import MoergeError
from moerge.moe.arch import ARCHS

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random", "library")
PROMPT_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {v!r}")
    return float(v)


def _prompts(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, str):
        raise ValueError("must be a list of prompts (- \"...\" on each line), not one string")
    if not isinstance(v, list):
        raise ValueError(f"must be a list of prompt strings, got {type(v).__name__}")
    for i, p in enumerate(v):
        if not isinstance(p, str):
            raise ValueError(f"[{i}] must be a string (quote it), got {p!r}")
    return v


class Expert(_Strict):
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    @field_validator("source_model", mode="before")
    @classmethod
    def _model(cls, v):
        return _ref(v)

    @field_validator("positive_prompts", "negative_prompts", mode="before")
    @classmethod
    def _p(cls, v):
        return _prompts(v)

    @field_validator("noise_scale", "residual_scale", mode="before")
    @classmethod
    def _num(cls, v):
        return _finite(v)

    @field_validator("noise_scale")
    @classmethod
    def _noise(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"must be >= 0 (the standard deviation of added noise), got {v}")
        return v


class MoEConfig(_Strict):
    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    seed: int = 0  # moerge's addition: random gates and noise_scale are reproducible
    _source: str = PrivateAttr("<recipe>")  # where it was read from, for error messages
    _text: str | None = PrivateAttr(None)

    @field_validator("base_model", mode="before")
    @classmethod
    def _model(cls, v):
        return _ref(v)

    @field_validator("gate_mode")
    @classmethod
    def _mode(cls, v):
        if v not in GATE_MODES:
            raise ValueError(f"unknown gate_mode {v!r}; use one of {', '.join(GATE_MODES)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        return check_dtype(v)

    @field_validator("experts_per_token", "seed", mode="before")
    @classmethod
    def _int(cls, v):
        return whole_number(v)

    @field_validator("experts_per_token")
    @classmethod
    def _ept(cls, v):
        if v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("shared_experts")
    @classmethod
    def _shared(cls, v):
        if v and len(v) > 1:
            raise ValueError(f"has {len(v)} entries; the MoE outputs take at most one shared expert (as in mergekit)")
        return v

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v):
        if v is not None and not any(a.name.lower().startswith(v.lower()) for a in ARCHS):
            raise ValueError(f"matches no output architecture; use one of {', '.join(a.name for a in ARCHS)} (or a "
                             "prefix: mixtral, deepseek, qwen, qwen3)")
        return v

    def model_refs(self) -> list[str]:
        return list(dict.fromkeys([self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]))

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, exclude_defaults=True, mode="json")
        data = {"base_model": data.pop("base_model"), "gate_mode": self.gate_mode, **data}
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


MOE_KEYS = ("experts", "gate_mode", "shared_experts", "experts_per_token", "architecture")


def is_moe(data: Any) -> bool:
    """A mergekit-moe config rather than a merge recipe: a mapping with no merge_method and a key only
    MoE configs have (experts:, gate_mode:, ...), so a config missing experts: is told exactly that."""
    return isinstance(data, dict) and "merge_method" not in data and any(k in data for k in MOE_KEYS)


def _at(source: str, lines: dict, path: tuple) -> str:
    line = None
    p = path
    while line is None and p:
        line = lines.get(p)
        p = p[:-1]
    return f"{located(source, line)}: {format_path(path) or 'config'}"


def parse_moe(text: str, source: str = "<recipe>") -> MoEConfig:
    """Parse and validate a mergekit-moe config; any problem is one line naming the key and YAML line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_error(e, source) from None
    lines = _line_map(text)
    try:
        cfg = MoEConfig.model_validate(data)
    except ValidationError as e:
        err = min(e.errors(), key=lambda x: len(x["loc"]))
        path = _error_path(tuple(err["loc"]))
        msg = _message(err)
        if err["type"] == "too_short" and path == ("experts",):
            msg = "is empty; give at least one expert (- source_model: ...)"
        raise MoergeError(f"{_at(source, lines, path)}: {msg}") from None
    check(cfg, source, lines)
    cfg._source, cfg._text = source, text
    return cfg


def check(cfg: MoEConfig, source: str, lines: dict) -> None:
    """mergekit's is_bad_config, as one-line errors naming the key (identical experts are checked when
    planning, where --i-understand-this-is-not-useful-without-training can allow them)."""
    n = len(cfg.experts)
    if cfg.experts_per_token > n:
        raise MoergeError(f"{_at(source, lines, ('experts_per_token',))}: is {cfg.experts_per_token} but there "
                          f"{'is' if n == 1 else 'are'} only {n} expert{'s' if n != 1 else ''}; lower it or add experts")
    if cfg.gate_mode == "library":
        for i, e in enumerate(cfg.experts):
            if not e.source_model.startswith("library://"):
                raise MoergeError(f"{_at(source, lines, ('experts', i, 'source_model'))}: gate_mode library takes each "
                                  "expert's router row from its library card's task centroid, so every expert must be "
                                  "library://NAME; give one, or use gate_mode hidden with prompts")
            for key in ("positive_prompts", "negative_prompts"):
                if getattr(e, key):
                    raise MoergeError(f"{_at(source, lines, ('experts', i, key))}: gate_mode library does not use prompts "
                                      "(the router row is the expert's task centroid); remove them, or use gate_mode hidden")
        return
    if cfg.gate_mode not in PROMPT_MODES:
        return
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            raise MoergeError(f"{_at(source, lines, ('experts', i))}: has no positive_prompts, which gate_mode "
                              f"{cfg.gate_mode} needs; give a few prompts this expert should handle")
    if n > 1:
        first = (cfg.experts[0].positive_prompts, cfg.experts[0].negative_prompts or [])
        if all((e.positive_prompts, e.negative_prompts or []) == first for e in cfg.experts[1:]):
            raise MoergeError(f"{_at(source, lines, ('experts',))}: every expert has the same positive and negative "
                              "prompts, so the router cannot tell them apart; give each expert prompts of its own")


def same_experts_error(cfg: MoEConfig, source: str, text: str | None) -> MoergeError | None:
    """mergekit refuses experts that are all one model (unless told it will be trained)."""
    if cfg.gate_mode == "random" or len(cfg.experts) < 2:
        return None
    if any(e.source_model != cfg.experts[0].source_model for e in cfg.experts[1:]):
        return None
    lines = _line_map(text) if text else {}
    return MoergeError(f"{_at(source, lines, ('experts', 1, 'source_model'))}: every expert is {cfg.experts[0].source_model}, "
                       "so the MoE computes what that one model computes at a larger cost; use different experts, or pass "
                       "--i-understand-this-is-not-useful-without-training to train it afterwards")
