"""Merge recipes: mergekit's YAML schema, validated by pydantic, with errors that name key and line.

Every mergekit key is either understood or refused by name; nothing is silently ignored. Parameter
settings keep mergekit's forms: a scalar, a gradient (a list interpolated across layers), or a list
of ``{filter, value}`` conditions matched against tensor names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moerge.errors import MoergeError
from moerge.methods import registry

Scalar = Union[bool, int, float, str]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


Setting = Union[Scalar, list[Scalar], Condition, list[Condition]]
Parameters = dict[str, Setting]

# mergekit keys we know but do not implement yet: refused by name rather than ignored
UNSUPPORTED = {
    "modules": "multi-module recipes (modules:) are not supported yet; use models: or slices:",
    "tokenizer": "the tokenizer: block (token surgery, union vocabularies) is not supported yet; use tokenizer_source: base or a model path",
    "residual_weight": "residual_weight in slices is not supported yet",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, why in UNSUPPORTED.items():
                if key in data and data[key] is not None:
                    raise ValueError(why)
        return data


def split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``path``, ``org/name``, ``org/name@revision`` or ``base+lora``, as mergekit spells them:
    returns (model, revision, lora)."""
    model, _, lora = ref.partition("+")
    rev = None
    if "@" in model and not model.startswith(("/", ".", "~")):
        model, _, rev = model.partition("@")
    return model, rev, lora or None


def _ref(v: Any) -> str:
    if isinstance(v, dict) and "model" in v:  # mergekit's long form {model: {path: ...}}
        m = v["model"]
        path = m.get("path") if isinstance(m, dict) else m
        lora = v.get("lora")
        lora_path = lora.get("path") if isinstance(lora, dict) else lora
        v = f"{path}+{lora_path}" if lora_path else path
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a path or hub id (string)")
    return v.strip()


class InputModel(Strict):
    model: str
    parameters: Parameters | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v):
        return _ref(v)


class SliceSource(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v):
        return _ref(v)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v):
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = None


DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


class Recipe(Strict):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: Any = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: Any = None
    chat_template: str | None = None
    seed: int = 0  # moerge's addition: random methods (DARE, DELLA) are reproducible
    name: str | None = None  # mergekit-moe/evolve recipes carry a name; kept for the card

    @field_validator("base_model", "tokenizer_source", mode="before")
    @classmethod
    def _model(cls, v):
        return None if v is None else _ref(v)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is None:
            return v
        v = DTYPE_ALIASES.get(v, v)
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPES)}")
        return v

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v):
        if v is not None and v != "chatml" and "{" not in v:
            raise ValueError("give a Jinja template or 'chatml'")
        return v

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v):
        if v not in registry.names():
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(registry.names())}")
        return v

    @model_validator(mode="after")
    def _shape(self):
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of models: or slices:")
        if self.models is not None and not self.models:
            raise ValueError("models: is empty")
        return self

    # ------------------------------------------------------------------ helpers
    def model_refs(self) -> list[str]:
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            refs += [src.model for src in s.sources] + ([s.base_model] if s.base_model else [])
        if self.tokenizer_source and self.tokenizer_source not in ("base", "union"):
            refs.append(self.tokenizer_source)
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, exclude_defaults=True, mode="json")
        data = {"merge_method": data.pop("merge_method"), **data}
        return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------- YAML with line numbers

def _line_map(text: str) -> dict[tuple, int]:
    """Map each key path (('models', 1, 'parameters', 'density')) to its 1-based YAML line."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
                lines[key] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if root is not None:
        walk(root, ())
    return lines


def format_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _error_path(loc: tuple) -> tuple:
    # pydantic adds union-branch names (e.g. 'list[Condition]', 'str') to locations; drop them
    keep = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "Condition", "function-after")):
            continue
        keep.append(part)
    return tuple(keep)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe text; any problem becomes one line naming the key and YAML line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MoergeError(f"{source}:{where}: not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise MoergeError(f"{source}: a recipe is a YAML mapping with merge_method and models or slices")
    lines = _line_map(text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = min(e.errors(), key=lambda x: len(x["loc"]))
        path = _error_path(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (moerge refuses keys it does not understand rather than ignore them)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        line = lines.get(path) or lines.get(path[:-1])
        where = f" line {line}" if line else ""
        raise MoergeError(f"{source}:{where}: {format_path(path) or 'recipe'}: {msg}") from None
    check_parameters(recipe, source, lines)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise MoergeError(f"{p}: no such recipe file; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoergeError(f"{p}: cannot read the recipe ({e})") from None
    return parse_recipe(text, str(p))


def _scalars(setting: Setting):
    """Every scalar a setting may yield, with its sub-path (for range checks)."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list):
        for i, item in enumerate(setting):
            if isinstance(item, Condition):
                vals = item.value if isinstance(item.value, list) else [item.value]
                for j, v in enumerate(vals):
                    yield (i, "value", j) if isinstance(item.value, list) else (i, "value"), v
            else:
                yield (i,), item
    else:
        yield (), setting


def check_parameters(recipe: Recipe, source: str, lines: dict[tuple, int]) -> None:
    """Refuse unknown parameter names and out-of-range values, naming the key path and line."""
    method = registry.get(recipe.merge_method)
    scopes: list[tuple[tuple, Parameters | None, bool]] = [(("parameters",), recipe.parameters, False)]
    for i, m in enumerate(recipe.models or []):
        scopes.append((("models", i, "parameters"), m.parameters, True))
    for i, s in enumerate(recipe.slices or []):
        scopes.append((("slices", i, "parameters"), s.parameters, False))
        for j, src in enumerate(s.sources):
            scopes.append((("slices", i, "sources", j, "parameters"), src.parameters, True))
    known = [p.name for p in method.params]
    for path, params, _ in scopes:
        for name, setting in (params or {}).items():
            param = method.param(name)
            here = path + (name,)
            if param is None:
                line = lines.get(here)
                hint = f"{method.name} takes: {', '.join(known)}" if known else f"{method.name} takes no parameters"
                raise MoergeError(f"{source}:{f' line {line}' if line else ''}: {format_path(here)}: unknown parameter ({hint})")
            for sub, value in _scalars(setting):
                try:
                    param.check(value)
                except ValueError as e:
                    full = here + sub
                    line = lines.get(full) or lines.get(here)
                    raise MoergeError(f"{source}:{f' line {line}' if line else ''}: {format_path(full)}: {e}") from None
