"""Merge recipes: mergekit's YAML schema, validated by pydantic, with errors that name key and line.

Every mergekit key is either understood or refused by name; nothing is silently ignored. Parameter
settings keep mergekit's forms: a scalar, a gradient (a list interpolated across layers), or a list
of ``{filter, value}`` conditions matched against tensor names.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moerge.engine.chat_templates import check
from moerge.engine.vocab import parse_tokenizer_block
from moerge.errors import MoergeError, MoergeWarning
from moerge.methods import registry

Scalar = Union[bool, int, float, str]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


FORMS = "a value, a gradient list [start, ..., end], or a list of {filter, value} conditions"


def _check_scalar(v: Any, what: str = "") -> None:
    if not isinstance(v, (bool, int, float, str)):
        kind = "a list" if isinstance(v, list) else ("a mapping" if isinstance(v, dict) else "null" if v is None else type(v).__name__)
        raise ValueError(f"{what}must be a number, true/false or a string, not {kind}")


def _check_setting(v: Any) -> Any:
    """A parameter setting in one of mergekit's forms; anything else is refused naming what is wrong
    (pydantic's own union errors would name an arbitrary branch, e.g. 'should be a valid boolean')."""
    def condition(c: Any, where: str) -> None:
        if isinstance(c, Condition):
            return
        unknown = [k for k in c if k not in ("filter", "value")]
        if unknown:
            raise ValueError(f"{where}unknown key {unknown[0]!r} in a condition; a condition is {{filter, value}}")
        if "value" not in c:
            raise ValueError(f"{where}a condition needs a value ({{filter: mlp, value: 0.5}})")
        if c.get("filter") is not None and not isinstance(c["filter"], str):
            raise ValueError(f"{where}filter must be a string (a substring of tensor names), not {c['filter']!r}")
        value = c["value"]
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{where}value is an empty list; give a value or a gradient [start, ..., end]")
            for i, x in enumerate(value):
                _check_scalar(x, f"{where}value[{i}] ")
        else:
            _check_scalar(value, f"{where}value ")

    if isinstance(v, dict):
        condition(v, "")
    elif isinstance(v, list):
        if not v:
            raise ValueError(f"is an empty list; give {FORMS}")
        conds = [isinstance(x, (dict, Condition)) for x in v]
        if all(conds):
            for i, c in enumerate(v):
                condition(c, f"[{i}] ")
        elif any(conds):
            raise ValueError(f"mixes values and {{filter, value}} conditions; give {FORMS}")
        else:
            for i, x in enumerate(v):
                _check_scalar(x, f"[{i}] ")
    elif not isinstance(v, Condition):
        _check_scalar(v)
    return v


Setting = Annotated[Union[Scalar, list[Scalar], Condition, list[Condition]], BeforeValidator(_check_setting)]
Parameters = dict[str, Setting]

# mergekit keys we know but do not implement yet: refused by name rather than ignored
UNSUPPORTED = {
    "modules": "multi-module recipes (modules:) are not supported yet; use models: or slices:",
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
    returns (model, revision, lora). A folder whose name holds ``+`` is a folder: the whole reference
    when it exists, else the split whose model side is a folder here (``./a+b+./lora``: model ``./a+b``)."""
    if os.path.exists(ref):
        return ref, None, None
    model, _, lora = ref.partition("+")
    for i in [i for i, c in enumerate(ref) if c == "+"][1:]:
        if os.path.exists(ref[:i]) and not os.path.exists(model):
            model, lora = ref[:i], ref[i + 1:]
            break
    rev = None
    if "@" in model and not model.startswith(("/", ".", "~")) and not os.path.exists(model):  # a folder named a@b is a folder
        model, _, rev = model.partition("@")
    return model, rev, lora or None


def _long_ref(v: dict) -> str:
    """mergekit's long form ``{model: {path, revision}, lora: {path, revision}}`` as ``path[@rev][+lora[@rev]]``."""
    unknown = [k for k in v if k not in ("model", "lora")]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in a model reference; give model: (and lora:) with path: and revision:")

    def part(x: Any, what: str) -> str:
        if isinstance(x, dict):
            bad = [k for k in x if k not in ("path", "revision")]
            if bad:
                raise ValueError(f"unknown key {bad[0]!r} in {what}; give path: and revision:")
            path, rev = x.get("path"), x.get("revision")
            if rev is not None and not isinstance(rev, str):
                raise ValueError(f"{what}.revision must be a string, got {rev!r}")
        else:
            path, rev = x, None
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{what} must be a path or hub id (string)")
        return f"{path.strip()}@{rev}" if rev else path.strip()

    ref = part(v["model"], "model")
    if v.get("lora") is not None:
        ref += "+" + part(v["lora"], "lora")
    return ref


def _ref(v: Any) -> str:
    if isinstance(v, dict) and "model" in v:  # mergekit's long form {model: {path: ...}}
        v = _long_ref(v)
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a path or hub id (string)")
    if not v.isprintable():
        raise ValueError(f"{v!r} holds control characters (a newline, a tab ...); give the path or hub id on one line")
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

    @field_validator("layer_range", mode="before")
    @classmethod
    def _pair(cls, v):
        def whole(x):
            return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and x.is_integer())

        if isinstance(v, (list, tuple)):  # "12" as mergekit's pydantic reads it (Tuple[int, int], lax mode)
            v = [int(x) if isinstance(x, str) and x.strip().removeprefix("-").removeprefix("+").isascii()
                 and x.strip().removeprefix("-").removeprefix("+").isdigit() else x for x in v]
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(whole(x) for x in v)):
            raise ValueError(f"must be [start, end], two whole numbers (layers start..end-1), got {_kind(v) if not isinstance(v, list) else v}")
        return [int(x) for x in v]

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
    residual_weight: float | None = None  # mergekit declares it and never uses it: accepted, with a warning

    @field_validator("base_model", mode="before")
    @classmethod
    def _model(cls, v):
        return None if v is None else _ref(v)

    @field_validator("residual_weight")
    @classmethod
    def _residual(cls, v):
        import warnings

        if v is not None:
            warnings.warn("slices: residual_weight has no effect (mergekit reads it and ignores it too)", MoergeWarning,
                          stacklevel=2)
        return v


DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def check_dtype(v: str | None) -> str | None:
    """A recipe's dtype by its canonical name (fp16 -> float16 ...); unknown names are refused."""
    if v is None:
        return v
    v = v.removeprefix("torch.")  # mergekit accepts torch.bfloat16 (its dtype_from_name strips the prefix)
    v = DTYPE_ALIASES.get(v, v)
    if v not in DTYPES:
        raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPES)}")
    return v


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

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, v):
        return whole_number(v)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        return check_dtype(v)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v):
        if v is not None:
            try:
                parse_tokenizer_block(v, "block")
            except MoergeError as e:
                raise ValueError(str(e).removeprefix("block: ").removeprefix("block.")) from None
            if isinstance(v.get("source"), str) and v["source"] not in ("base", "union"):
                v = dict(v) | {"source": _ref(v["source"])}
        return v

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v):
        return v if v is None else check(v)

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
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or a tokenizer: block, not both (as in mergekit)")
        return self

    @model_validator(mode="after")
    def _bools(self):
        """A true/false parameter written 1 or 0 (``normalize: 1``): mergekit reads every setting as a
        float and tests it for truth, so it accepts these; moerge reads them as true and false. Other
        numbers stay numbers and are refused by the range check, naming the key."""
        method = registry.get(self.merge_method)

        def fix(v):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v in (0, 1):
                return bool(v)
            if isinstance(v, list):
                return [fix(x) for x in v]
            if isinstance(v, Condition):
                v.value = fix(v.value)
            return v

        scopes = [self.parameters] + [m.parameters for m in self.models or []]
        for s in self.slices or []:
            scopes += [s.parameters] + [src.parameters for src in s.sources]
        for scope in scopes:
            for name, setting in (scope or {}).items():
                param = method.param(name)
                if param is not None and param.type is bool:
                    scope[name] = fix(setting)
        return self

    @field_validator("slices")
    @classmethod
    def _slices(cls, v, info: ValidationInfo):
        if v is not None and not v and info.data.get("models") is None:  # with models: too, _shape says which
            raise ValueError("is empty; give at least one slice with sources and layer_range")
        return v

    def with_refs(self, refs: dict[str, str]) -> "Recipe":
        """A copy with model references replaced (``refs``: as written -> replacement), wherever they
        appear: base_model, models, slices and their sources, tokenizer_source."""
        if not refs:
            return self
        r = self.model_copy(deep=True)

        def sub(v: str | None) -> str | None:
            return refs.get(v, v) if v is not None else None

        r.base_model = sub(r.base_model)
        if r.tokenizer_source not in ("base", "union"):
            r.tokenizer_source = sub(r.tokenizer_source)
        if isinstance(r.tokenizer, dict):
            r.tokenizer = _sub_tokenizer_refs(r.tokenizer, sub)
        for m in r.models or []:
            m.model = sub(m.model)
        for s in r.slices or []:
            s.base_model = sub(s.base_model)
            for src in s.sources:
                src.model = sub(src.model)
        return r

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
        src = self.tokenizer.get("source") if isinstance(self.tokenizer, dict) else None
        if isinstance(src, str) and src not in ("base", "union"):
            refs.append(src)
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, exclude_defaults=True, mode="json")
        data = {"merge_method": data.pop("merge_method"), **data}
        return yaml.safe_dump(data, sort_keys=False)


def _sub_tokenizer_refs(block: dict, sub) -> dict:
    """The tokenizer: block with its model references (source, tokens' sources) replaced by ``sub``."""
    out = dict(block)
    if isinstance(out.get("source"), str) and out["source"] not in ("base", "union"):
        out["source"] = sub(out["source"])
    tokens = {}
    for tok, cfg in (out.get("tokens") or {}).items():
        cfg = dict(cfg or {})
        src = cfg.get("source")
        if isinstance(src, str):
            cfg["source"] = sub(src)
        elif isinstance(src, dict) and isinstance(src.get("model"), str):
            cfg["source"] = dict(src) | {"model": sub(src["model"])}
        tokens[tok] = cfg
    if tokens:
        out["tokens"] = tokens
    return out


# ---------------------------------------------------------------------- YAML with line numbers

def _line_map(text: str) -> dict[tuple, int]:
    """Map each key path (('models', 1, 'parameters', 'density')) to its 1-based YAML line."""
    lines: dict[tuple, int] = {}

    def walk(node, path, above=()):
        if id(node) in above:  # an alias of an enclosing node: a recursive structure, walked once
            return
        above = above + (id(node),)
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):  # safe_load refuses such keys first
                    continue
                key = path + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key, above)
                lines[key] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,), above)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            walk(root, ())
    except (yaml.YAMLError, RecursionError):
        return lines
    return lines


def _show(text: str) -> str:
    """Text for a one-line message: as is, or quoted with escapes if it holds control characters."""
    return text if text.isprintable() else repr(text)


def format_path(path: tuple) -> str:
    out = ""
    for p in path:
        p = p if isinstance(p, int) else _show(str(p))
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _error_path(loc: tuple) -> tuple:
    # pydantic adds union-branch names (e.g. 'list[Condition]', 'str') to locations; drop them
    keep = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "Condition", "function-after")):
            continue
        keep.append(part)
    return tuple(keep)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, (dict, list)):
        return "a mapping" if isinstance(v, dict) else "a list"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _message(err: dict) -> str:
    """pydantic's message in recipe terms (no Python class names)."""
    kind, got = err["type"], _kind(err.get("input"))
    if kind == "extra_forbidden":
        return "unknown key (moerge refuses keys it does not understand rather than ignore them)"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (key: value), got {got}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {got}"
    if kind == "string_type":
        return f"must be a string, got {got}"
    if kind in ("int_type", "int_parsing", "int_from_float", "int_parsing_size"):
        return f"must be a whole number, got {got}"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"must be a number, got {got}"
    if kind in ("too_long", "too_short") and isinstance(err.get("input"), (list, tuple)):
        return f"has {len(err['input'])} items; {err['msg'].split(' after validation')[0].lower().replace('tuple ', '').replace('list ', '')}"
    return err["msg"].removeprefix("Value error, ")


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe text; any problem becomes one line naming the key and YAML line."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise MoergeError(f"{source}: the YAML is nested too deeply to be a recipe; fix its structure") from None
    except yaml.YAMLError as e:
        raise yaml_error(e, source) from None
    if not isinstance(data, dict):
        raise MoergeError(f"{source}: a recipe is a YAML mapping with merge_method and models or slices")
    lines = _line_map(text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = min(e.errors(), key=lambda x: len(x["loc"]))
        path = _error_path(tuple(err["loc"]))
        msg = _message(err)
        line = lines.get(path) or lines.get(path[:-1])
        raise MoergeError(f"{located(source, line)}: {format_path(path) or 'recipe'}: {msg}") from None
    check_parameters(recipe, source, lines)
    return recipe


def located(source: str, line: int | None) -> str:
    """``file: line N`` (or just ``file`` when the line is unknown): how every error line starts."""
    return f"{source}: line {line}" if line else source


def yaml_error(e: yaml.YAMLError, source: str) -> MoergeError:
    """A YAML syntax error as one line with its line number."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return MoergeError(f"{located(source, mark.line + 1 if mark else None)}: not valid YAML ({problem}); fix the syntax")


def recipe_yaml(data: dict, where: str = "<recipe>") -> str:
    """A recipe given as a Python dict, as YAML text for the parser (one line if it holds a value YAML
    cannot represent: an object, a tensor)."""
    try:
        return yaml.safe_dump(data, sort_keys=False)
    except yaml.YAMLError as e:
        raise MoergeError(f"{where}: holds a value a recipe cannot have ({str(e).splitlines()[0][:120]}); "
                          "use strings, numbers, lists and dicts") from None


def whole_number(v: Any) -> int:
    """A pydantic before-validator body: ints only (not bools, not floats)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"must be a whole number, got {v!r}")
    return v


def read_recipe_text(path: str | Path) -> str:
    """A recipe file's text; a missing, unreadable or wrong path is one line."""
    p = Path(path)
    try:
        return p.read_text()
    except FileNotFoundError:
        raise MoergeError(f"{p}: no such recipe file; check the path") from None
    except IsADirectoryError:
        raise MoergeError(f"{p}: is a folder, not a recipe file; give the recipe's YAML file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise MoergeError(f"{_show(str(p))}: cannot read the recipe ({e}); check the path") from None


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_recipe_text(path), str(path))


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


def check_value(param, value: Any) -> Any:
    """``param.check`` (type and range), also refusing non-finite numbers: a NaN or infinite weight
    would only surface as a model full of NaNs."""
    try:
        checked = param.check(value)
    except OverflowError:  # int(inf)
        raise ValueError(f"must be a finite number, got {value!r}") from None
    if isinstance(checked, float) and not math.isfinite(checked):
        raise ValueError(f"must be a finite number, got {value!r}")
    return checked


def check_parameters(recipe: Recipe, source: str, lines: dict[tuple, int], warn: bool = True) -> None:
    """Refuse out-of-range values and names no method uses (with a did-you-mean), naming the key path
    and line. A parameter of another method (mergekit's own configs put ``weight`` on slerp) is
    accepted, as mergekit accepts it, with one ``MoergeWarning`` saying the method ignores it."""
    import difflib
    import warnings

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
                at = f"{located(source, line)}: {format_path(here)}"
                if name in registry.all_param_names():
                    if warn:
                        warnings.warn(f"{at}: {method.name} does not use '{name}'; ignored", MoergeWarning, stacklevel=2)
                    continue
                close = difflib.get_close_matches(str(name), known + sorted(registry.all_param_names()), n=1)
                hint = f"{method.name} takes: {', '.join(known)}" if known else f"{method.name} takes no parameters"
                raise MoergeError(f"{at}: unknown parameter" + (f"; did you mean '{close[0]}'?" if close else "") + f" ({hint})")
            for sub, value in _scalars(setting):
                try:
                    check_value(param, value)
                except ValueError as e:
                    full = here + sub
                    line = lines.get(full) or lines.get(here)
                    raise MoergeError(f"{located(source, line)}: {format_path(full)}: {e}") from None
