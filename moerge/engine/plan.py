"""Recipe -> plan: for every output tensor, its inputs, method, and resolved parameters.

Planning opens every input lazily (headers only) and checks everything that can be checked without
reading weights: that each model exists and has each tensor, that shapes agree, that parameters are
present and in range, that the method gets the inputs it needs. A plan that builds will run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.engine import params as P
from moerge.engine.recipe import Parameters, Recipe, check_parameters, split_ref
from moerge.engine.stats import requested
from moerge.engine.vocab import config_vocab_size, plan_alignment
from moerge.errors import MoergeError, MoergeWarning
from moerge.experts.card import read_card
from moerge.experts.peft_format import ExpertAppliedSource, load_adapter
from moerge.io.hub import resolve as resolve_ref
from moerge.io.hub import snapshot_commit
from moerge.io.source import TensorSource, adapter_folder, open_source
from moerge.library import Library
from moerge.library.store import BASE_NAME
from moerge.library.store import split_ref as split_library_ref
from moerge.methods import registry
from moerge.methods.registry import Method

LAYER = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")
PRE_LAYER = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Model:
    """An opened input: its reference as written, local folder, lazy tensors and config, and
    ``pinned``: the reference to exactly what was opened (``library://sort@2`` for ``library://sort``,
    ``org/name@<commit>`` for a hub id), which saved recipes and cards record."""

    ref: str
    folder: Path
    source: TensorSource
    config: dict[str, Any]
    lora: Path | None = None
    pinned: str = ""
    card: dict | None = None  # a library expert's card (an adapter folder's is its expert.json): its training data

    def __post_init__(self):
        self.pinned = self.pinned or self.ref

    def expert_card(self) -> dict:
        """Its expert card: a library expert's, else the adapter folder's expert.json ({} when none)."""
        if self.card is None:

            self.card = read_card(self.lora) if self.lora is not None else {}
        return self.card

    def num_layers(self) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            text = self.config.get("text_config")
            v = self.config.get(key) or (text.get(key) if isinstance(text, dict) else None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        idx = [int(m["idx"]) for n in self.source.names() if (m := LAYER.match(n))]
        return max(idx) + 1 if idx else 0


@dataclass
class TensorTask:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: list[tuple[int, str]]  # (model index, tensor name), non-base inputs in recipe order
    base: tuple[int, str] | None
    shared: dict[str, Any]
    per_input: dict[str, list[Any]]
    seed: int
    floating: bool = True

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.out_dtype)


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype (what an output file will hold)."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


@dataclass
class Plan:
    recipe: Recipe
    method: Method
    models: list[Model]
    tasks: list[TensorTask]
    config: dict[str, Any] | None
    config_from: Model
    tokenizer_from: Model | None
    cast: torch.dtype | None
    notes: list[str] = field(default_factory=list)
    alignment: Any = None  # engine.vocab.Alignment when the inputs' vocabularies are aligned by token
    stats: list | None = None  # engine.stats.gather's per-model statistics, for a data-aware method

    @property
    def pinned_recipe(self) -> Recipe:
        """The recipe with every model reference pinned to what was merged (see ``Model.pinned``):
        re-running it reproduces this merge even after new library versions or hub commits."""
        return self.recipe.with_refs({m.ref: m.pinned for m in self.models if m.pinned != m.ref})

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    def input_bytes(self) -> int:
        total = 0
        for t in self.tasks:
            for i, name in t.inputs + ([t.base] if t.base else []):
                total += self.models[i].source.info(name).nbytes
        return total

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tasks:
            k = "copied (not floating point)" if not t.floating else (f"{self.method.name} of {len(t.inputs) + (1 if t.base else 0)} inputs")
            counts[k] = counts.get(k, 0) + 1
        lines = [
            f"method: {self.method.name}" + (f" (seed {self.recipe.seed})" if self.method.random else ""),
            "inputs: " + ", ".join(m.pinned for m in self.models),  # as pinned: library://sort@2, org/name@<commit>
            f"output tensors: {len(self.tasks)}  ({', '.join(f'{v} {k}' for k, v in counts.items())})",
            f"output size: {_human(self.output_bytes)}  (dtype {', '.join(sorted({str(t.out_dtype).removeprefix('torch.') for t in self.tasks}))})",
            f"reads: {_human(self.input_bytes())}",
        ]
        if self.config and "num_hidden_layers" in self.config:
            lines.append(f"layers: {self.config['num_hidden_layers']}")
        if self.method.stats:  # data-aware: what each input's statistics will be computed on

            datas, n = requested(self)
            what = {"fisher": "diagonal Fisher", "gram": "per-layer input Gram matrices"}[self.method.stats]
            lines.append(f"statistics (computed before merging, cached): {what} on {n} examples of each model's data: " +
                         ", ".join(f"{self.models[i].ref}: {d or 'its expert card'}" for i, d in sorted(datas.items())))
        return "\n".join(lines + self.notes)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


LIBRARY_SCHEME = "library://"


def open_model(ref: str, library: str | os.PathLike | None = None) -> Model:
    """A model reference as a lazy source: a folder or hub id, ``base+adapter``, or
    ``library://NAME[@VERSION]`` (an expert of the library at ``library``, else ``$MOERGE_LIBRARY``,
    else the current folder, applied to that library's base), or ``library://base[@N]``, the library's
    base (base@N; default the latest)."""
    if ref.startswith(LIBRARY_SCHEME):
        try:
            lib = Library.open(library)
        except MoergeError as e:  # no library here: the recipe's reference says which one was meant
            raise MoergeError(f"{ref}: {e}; or say where the library is: --library DIR (or $MOERGE_LIBRARY)") from None
        name, version = split_library_ref(ref[len(LIBRARY_SCHEME):])
        if name == BASE_NAME:
            b = lib.base(version)
            source = lib.base_source(b.version)
            return Model(ref, b.path, source, _read_config(b.path), None, f"{LIBRARY_SCHEME}{b.ref}")
        try:
            entry = lib.get(ref[len(LIBRARY_SCHEME):])
        except MoergeError as e:
            raise MoergeError(f"{e} (the library's base is library://base, or library://base@N)") from None
        base = lib.base_source(entry.base_version)  # the base version it was made on
        source = ExpertAppliedSource(base, lib.load(entry.ref), f"{LIBRARY_SCHEME}{entry.ref}")
        folder = lib.base(entry.base_version).path
        return Model(ref, folder, source, _read_config(folder), None, f"{LIBRARY_SCHEME}{entry.ref}", entry.card)
    name, rev, lora = split_ref(ref)
    folder = resolve_ref(name, rev)
    _refuse_adapter(name, folder, lora)
    parts = [ref.partition("+")[0]] + ([lora] if lora else [])
    pinned = [_pinned(parts[0], folder)]
    source: TensorSource = open_source(folder)
    lora_dir = None
    if lora:
        lname, lrev, _ = split_ref(lora)
        lora_dir = resolve_ref(lname, lrev)
        pinned.append(_pinned(lora, lora_dir))
        source = ExpertAppliedSource(source, load_adapter(lora_dir, source), str(lora_dir))
    return Model(ref, folder, source, _read_config(folder), lora_dir, "+".join(pinned) if pinned != parts else ref)


def _pinned(part: str, folder: Path) -> str:
    """One side of ``model+adapter`` as it was resolved: a hub id gets its snapshot's commit."""
    name, rev, _ = split_ref(part)
    commit = snapshot_commit(name, folder)
    return f"{name}@{commit}" if commit and commit != rev else part


def _refuse_adapter(name: str, folder: Path, lora: str | None) -> None:
    """A PEFT adapter folder (or its adapter_model file) given where a model belongs: say so, and
    show the ``BASE+adapter`` form, instead of failing later on missing tensors."""
    adapter = adapter_folder(folder)
    if adapter is None:
        return
    written = name if adapter == folder else str(Path(name).parent)
    base = "BASE"
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        if isinstance(cfg, dict) and isinstance(cfg.get("base_model_name_or_path"), str) and cfg["base_model_name_or_path"].strip():
            base = cfg["base_model_name_or_path"].strip()
    except (OSError, ValueError):
        pass
    raise MoergeError(f"{name}: is a PEFT adapter (it has adapter_config.json), not a model{' (it is left of +)' if lora else ''}; "
                      f"apply it to its base: `model: {base}+{written}` (the form BASE+path/to/adapter)")


def _read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json" if folder.is_dir() else None
    if cfg is None or not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise MoergeError(f"{cfg}: not valid JSON ({e.msg} at line {e.lineno}); fix or re-download it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoergeError(f"{cfg}: cannot read it ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise MoergeError(f"{cfg}: is not a JSON object (a model config is {{\"key\": value, ...}}); fix or re-download it")
    return data


def tensor_seed(seed: int, name: str) -> int:
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _layer_key(name: str):
    m = LAYER.match(name)
    if not m:
        return (0 if PRE_LAYER.search(name) else 2, 0, name)
    return (1, int(m["idx"]), m["rest"])


class Planner:
    def __init__(self, recipe: Recipe, models: dict[str, Model] | None = None, library: str | os.PathLike | None = None):
        self.recipe = recipe
        self.library = library
        self.method = registry.get(recipe.merge_method)
        self._models: dict[str, Model] = dict(models or {})
        self.order: list[str] = []
        self.cast = DTYPES[recipe.dtype] if recipe.dtype else None
        self.out_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else self.cast
        self.tasks: list[TensorTask] = []
        self.alignment = None  # set by build(): embeddings aligned by token (engine/vocab.py)

    def model(self, ref: str) -> int:
        if ref not in self._models:
            self._models[ref] = open_model(ref, self.library)
        if ref not in self.order:
            self.order.append(ref)
        return self.order.index(ref)

    def m(self, idx: int) -> Model:
        return self._models[self.order[idx]]

    # ------------------------------------------------------------------ one tensor
    def add(self, out_name: str, sources: list[tuple[str, str, Parameters | None]], base: tuple[str, str] | None,
            shared_scopes: list[Parameters | None], t: float, where: str) -> None:
        """sources: (model ref, input tensor name, that input's own parameters) for non-base inputs."""
        method = self.method
        idx = [(self.model(ref), name) for ref, name, _ in sources]
        bidx = (self.model(base[0]), base[1]) if base else None
        everything = ([bidx] if bidx else []) + idx
        infos = []
        for i, name in everything:
            model = self.m(i)
            if name not in model.source:
                raise MoergeError(f"{model.ref}: lacks tensor {name!r} that the other inputs have; is it the same architecture?")
            infos.append((model.ref, model.source.info(name)))
        ref0, info0 = infos[0]
        aligned = self.alignment is not None and out_name in self.alignment.names
        if aligned:  # rows are permuted onto the output vocabulary: only the widths must agree
            for ref, info in infos[1:]:
                if info.shape[1:] != info0.shape[1:]:
                    raise MoergeError(f"tensor {out_name!r}: width {list(info.shape[1:])} in {ref} but {list(info0.shape[1:])} "
                                      f"in {ref0}; these models are not merge-compatible")
            info0 = type(info0)(info0.name, info0.dtype, (self.alignment.rows, *info0.shape[1:]), info0.path, 0, 0)
        for ref, info in infos[1:] if not aligned else []:
            if info.shape != info0.shape:
                raise MoergeError(
                    f"tensor {out_name!r}: shape {list(info.shape)} in {ref} but {list(info0.shape)} in {ref0}; "
                    "these models are not merge-compatible (different sizes or vocabularies)"
                )
        floating = all(info.dtype.is_floating_point for _, info in infos)
        out_dtype = self.out_dtype or info0.dtype
        if not floating:
            self.tasks.append(TensorTask(out_name, info0.shape, info0.dtype, [everything[0]], None, {}, {}, 0, False))
            return
        shared: dict[str, Any] = {}
        per: dict[str, list[Any]] = {}
        for p in method.params:
            if p.per_input:
                values = []
                for (ref, name, own), (i, _) in zip(sources, idx):
                    v = self._resolve(p, [own] + shared_scopes, name, t, where)
                    if v is P.MISSING:
                        tensor = "" if where == f"tensor {name}" else f" (tensor {name})"
                        raise MoergeError(f"{where}: {ref} needs parameter '{p.name}' for {self.method.name}{tensor}; "
                                          "add it under that model's parameters")
                    values.append(v)
                per[p.name] = values
            else:
                v = self._resolve(p, shared_scopes, out_name, t, where)
                if v is P.MISSING:
                    raise MoergeError(f"{where}: {self.method.name} needs parameter '{p.name}'; add it under parameters")
                shared[p.name] = v
        if "density" in per and "epsilon" in per:
            for d, e in zip(per["density"], per["epsilon"]):
                if d < 1 and not (0 < d - e and d + e < 1):
                    raise MoergeError(f"{where}: density {d:g} ± epsilon {e:g} must stay inside (0, 1); lower epsilon")
        self.tasks.append(TensorTask(out_name, info0.shape, out_dtype, idx, bidx, shared, per,
                                     tensor_seed(self.recipe.seed, out_name)))

    def _resolve(self, param, scopes, name: str, t: float, where: str):
        try:
            return P.resolve(param, scopes, name, t)
        except (ValueError, OverflowError) as e:  # values are checked when the recipe is read; this is the backstop
            raise MoergeError(f"{where}: parameter '{param.name}': {e}") from None

    # ------------------------------------------------------------------ structure
    def _check_counts(self, n_inputs: int, where: str, has_base: bool) -> None:
        m = self.method
        if m.base == "required" and not has_base:
            raise MoergeError(f"{where}: {m.name} needs a base_model; add base_model: to the recipe")
        if n_inputs < m.min_inputs or (m.max_inputs is not None and n_inputs > m.max_inputs):
            want = f"exactly {m.min_inputs}" if m.min_inputs == m.max_inputs else (
                f"at least {m.min_inputs}" if m.max_inputs is None else f"{m.min_inputs} to {m.max_inputs}")
            extra = " besides the base" if m.base != "ignored" else ""
            raise MoergeError(f"{where}: {m.name} takes {want} model(s){extra}, got {n_inputs}")

    def plan_models(self) -> None:
        r = self.recipe
        base_ref = r.base_model if self.method.base != "ignored" else None
        entries = [(m.model, m.parameters) for m in r.models or []]
        if base_ref:
            entries = [e for e in entries if e[0] != base_ref]
        elif r.base_model and r.base_model not in [ref for ref, _ in entries]:
            self._base_joins(entries)
        self._check_counts(len(entries), "models", base_ref is not None)
        ref_model = self.model(base_ref) if base_ref else None
        for ref, _ in entries:
            self.model(ref)
        reference = self.m(ref_model if ref_model is not None else self.model(entries[0][0]))
        n_layers = reference.num_layers()
        for name in sorted(reference.source.names(), key=_layer_key):
            lm = LAYER.match(name)
            t = (int(lm["idx"]) / (n_layers - 1) if n_layers > 1 else 1.0) if lm else 0.0
            self.add(name, [(ref, name, own) for ref, own in entries],
                     (base_ref, name) if base_ref else None, [r.parameters], t, f"tensor {name}")

    def _base_joins(self, entries: list) -> None:
        """A method that has no base (linear, karcher) given a base_model that is not under models:
        mergekit adds the base as one more input, so moerge does too (outputs match); its per-model
        parameters come from the recipe's top level. passthrough copies one input, so mergekit fails
        there; moerge says why instead."""
        import warnings

        r = self.recipe
        if self.method.max_inputs is not None and len(entries) + 1 > self.method.max_inputs:
            raise MoergeError(f"base_model: {self.method.name} takes {self.method.max_inputs} model(s), and mergekit adds a "
                              f"base_model that is not under models: as one more input; remove base_model or list only it")
        missing = [p.name for p in self.method.params if p.per_input and p.required and p.name not in (r.parameters or {})]
        if missing:
            raise MoergeError(f"base_model: {r.base_model} is not under models:, so (as in mergekit) it joins the "
                              f"{self.method.name} merge as an input and needs '{missing[0]}'; list it under models with its "
                              f"parameters, set {missing[0]} at the top level, or remove base_model")
        entries.append((r.base_model, None))
        note = (f"base_model {r.base_model} joins the {self.method.name} merge as an input (it is not under models:; "
                "mergekit adds it the same way)")
        warnings.warn(note, MoergeWarning, stacklevel=2)

    def plan_slices(self) -> dict[str, Any]:
        r = self.recipe
        out_layer = 0
        layer_sources: list[tuple[str, int]] = []  # (model ref, source layer) of each output layer
        plans = []
        for si, s in enumerate(r.slices):
            where = f"slices[{si}]"
            lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lengths) != 1:
                raise MoergeError(f"{where}: every source must span the same number of layers, got {sorted(lengths)}")
            base_ref = (s.base_model or r.base_model) if self.method.base != "ignored" else None
            srcs = list(s.sources)
            base_src = next((x for x in srcs if x.model == base_ref), None) if base_ref else None
            if base_ref and base_src is None:
                if self.method.base == "required":
                    raise MoergeError(f"{where}: {self.method.name} needs the base model {base_ref} among this slice's sources")
                base_ref = None
            non_base = [x for x in srcs if x is not base_src]
            self._check_counts(len(non_base), where, base_src is not None)
            for x in srcs:
                m = self.m(self.model(x.model))
                if x.layer_range[1] > m.num_layers():
                    raise MoergeError(f"{where}: layer_range {list(x.layer_range)} exceeds the {m.num_layers()} layers of {x.model}")
            plans.append((s, base_src, non_base))
        for s, base_src, non_base in plans:
            first = base_src or non_base[0]
            model = self.m(self.model(first.model))
            length = first.layer_range[1] - first.layer_range[0]
            layer_names = {}
            for n in model.source.names():
                lm = LAYER.match(n)
                if lm and int(lm["idx"]) == first.layer_range[0]:
                    layer_names[lm["rest"]] = lm["pre"]
            for off in range(length):
                t = off / (length - 1) if length > 1 else 1.0
                for rest, pre in sorted(layer_names.items()):
                    name_of = lambda x: f"{pre}.{x.layer_range[0] + off}.{rest}"  # noqa: E731
                    self.add(f"{pre}.{out_layer}.{rest}",
                             [(x.model, name_of(x), x.parameters) for x in non_base],
                             (base_src.model, name_of(base_src)) if base_src else None,
                             [s.parameters, r.parameters], t, f"slices: output layer {out_layer}")
                layer_sources.append((first.model, first.layer_range[0] + off))
                out_layer += 1
        # tensors outside the layer stack: embeddings from the first slice, the rest from the last
        for pos, (s, base_src, non_base) in ((0, plans[0]), (2, plans[-1])):
            model = self.m(self.model((base_src or non_base[0]).model))
            for n in sorted(model.source.names(), key=_layer_key):
                if LAYER.match(n) or (_layer_key(n)[0] != pos):
                    continue
                self.add(n, [(x.model, n, x.parameters) for x in non_base],
                         (base_src.model, n) if base_src else None, [s.parameters, r.parameters], 0.0, f"tensor {n}")
        return {"num_layers": out_layer, "layer_sources": layer_sources}

    def build(self) -> Plan:
        r = self.recipe
        self.alignment = plan_alignment(self)
        layout = self.plan_slices() if r.slices else None
        if r.models:
            self.plan_models()
        cfg_ref = r.base_model or (r.models[0].model if r.models else r.slices[0].sources[0].model)
        cfg_model = self.m(self.model(cfg_ref))
        config = dict(cfg_model.config) if cfg_model.config else None
        if config is not None:
            out = self.out_dtype
            if out is not None:
                config["torch_dtype"] = str(out).removeprefix("torch.")
                if "dtype" in config:
                    config["dtype"] = config["torch_dtype"]
            if layout:
                _relayer(config, layout, self)
            if self.alignment is not None and config_vocab_size(config) is not None:
                holder = config["text_config"] if "vocab_size" not in config else config
                holder["vocab_size"] = self.alignment.rows
        tok = None
        source = r.tokenizer.get("source", "union") if isinstance(r.tokenizer, dict) else r.tokenizer_source
        if source and source not in ("base", "union"):
            tok = self.m(self.model(source))
        elif source == "base" and r.base_model:
            tok = self.m(self.model(r.base_model))
        models = [self._models[ref] for ref in self.order]
        plan = Plan(r, self.method, models, self.tasks, config, cfg_model, tok or cfg_model, self.cast)
        plan.alignment = self.alignment
        if self.alignment is not None:
            plan.notes.append(f"vocabulary: {len(self.alignment.vocab)} tokens ({self.alignment.rows} rows), embeddings "
                              f"aligned by token string: {', '.join(sorted(self.alignment.names))}")
        return plan


def _relayer(config: dict, layout: dict, planner: Planner) -> None:
    """Slices change the depth: update the layer count and per-layer config lists."""
    n = layout["num_layers"]
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            old = config[key]
            config[key] = n
            for k, v in list(config.items()):
                if isinstance(v, list) and len(v) == old and k.endswith(("layer_types", "_layers_types", "layer_type")):
                    per_source = {}
                    for ref, layer in layout["layer_sources"]:
                        src_cfg = planner._models[ref].config.get(k)
                        per_source.setdefault(ref, src_cfg if isinstance(src_cfg, list) else v)
                    config[k] = [per_source[ref][layer] for ref, layer in layout["layer_sources"]]
            break


def build_plan(recipe: Recipe, library: str | os.PathLike | None = None) -> Plan:
    check_parameters(recipe, "<recipe>", {}, warn=False)  # a Recipe built in Python has not been through parse_recipe
    return Planner(recipe, library=library).build()
