"""Multi-document recipes: several merges in one file, as ``mergekit-multi`` runs them.

Each YAML document (separated by ``---``) is a normal recipe; a ``name:`` makes it a stage whose
output later documents use as a model reference (in ``models``, ``base_model``, ``slices`` sources,
``tokenizer_source``; ``NAME+adapter`` applies an adapter to it). As in mergekit, a document may use
a stage defined after it (stages run in dependency order, not file order), names are unique, and at
most one document goes unnamed: that one is the final output. When every document is named, the
final output is the one stage no other stage uses.

Everything that can be checked is checked before any stage runs: each document (YAML, keys, methods,
parameters, with the file's line numbers), the names (duplicates, cycles, references to nothing), and
every stage's plan. A stage that uses an earlier stage is planned on that stage's *expected* output:
its plan's tensor names, shapes and dtypes, config and tokenizer (``ExpectedOutput``), so a shape or
tensor mismatch in the last stage stops the run before the first stage spends any time. Only a stage
that applies an adapter to an earlier output (``NAME+adapter``) waits for that output to be planned.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from moerge.engine.card import StageRecord, lineage, saved_recipe, stage_yaml
from moerge.engine.executor import MergeResult, _check_output, execute
from moerge.engine.plan import Model, Planner, _pinned, _read_config, open_model
from moerge.engine.recipe import (
    Recipe,
    _line_map,
    format_path,
    located,
    parse_recipe,
    read_recipe_text,
    recipe_yaml,
    split_ref,
    yaml_error,
)
from moerge.errors import MoergeError
from moerge.experts.peft_format import ExpertAppliedSource, load_adapter
from moerge.io.hub import resolve as resolve_ref
from moerge.io.safetensors_file import TensorInfo
from moerge.io.source import open_source
from moerge.io.writer import parse_size

if TYPE_CHECKING:  # plan imports torch: loaded only when a recipe is planned
    from moerge.engine.executor import MergeResult
    from moerge.engine.plan import Model, Plan

NAME_OK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


# ---------------------------------------------------------------------- the recipe

@dataclass
class Site:
    """Where a stage names a model: key path, reference as written, its line in the file."""

    path: tuple
    ref: str
    line: int | None
    stage: str | None = None  # the stage it refers to, if any

    @property
    def key(self) -> str:
        return format_path(self.path)


@dataclass
class Stage:
    """One document of a multi-document recipe."""

    name: str | None  # None: the unnamed document, mergekit's final merge
    recipe: Recipe  # as written: other stages are referred to by name
    line: int  # the document's first line (its name: line when it has one)
    index: int  # position in the file
    sites: list[Site] = field(default_factory=list)

    @property
    def uses(self) -> list[str]:
        """The stages it reads, in the order it names them."""
        return list(dict.fromkeys(s.stage for s in self.sites if s.stage is not None))

    @property
    def label(self) -> str:
        return f"stage '{self.name}'" if self.name is not None else "the unnamed final stage"

    @property
    def title(self) -> str:
        return self.name if self.name is not None else "(unnamed final stage)"


@dataclass
class MultiRecipe:
    """Several recipes in one file: ``stages`` in run order (dependency order; the last writes OUT)."""

    source: str
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str | None) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def names(self) -> list[str]:
        return [s.name for s in self.stages if s.name is not None]

    def unused(self) -> list[Stage]:
        """Named stages that no stage uses, besides the final one: their output is not part of OUT."""
        used = {n for s in self.stages for n in s.uses}
        return [s for s in self.stages[:-1] if s.name not in used]

    def needs(self, stage: Stage) -> list[Stage]:
        """The stages ``stage`` depends on, directly or not, in run order."""
        want: set[str] = set()
        todo = list(stage.uses)
        while todo:
            n = todo.pop()
            if n not in want:
                want.add(n)
                todo += self.stage(n).uses
        return [s for s in self.stages if s.name in want]

    def to_yaml(self) -> str:
        """The stages as one multi-document YAML text, in run order."""
        return "---\n".join(stage_yaml(s.recipe) for s in self.stages)


def _where(source: str, line: int | None, stage: Stage | None = None) -> str:
    return f"{located(source, line)}:" + (f" {stage.label}:" if stage is not None else "")


def _in_stage(message: str, source: str, label: str, line: int) -> str:
    """parse_recipe's ``source: line N: key: what`` with the stage's name put after the line."""
    rest = message[len(source) + 1:] if message.startswith(source + ":") else " " + message
    m = re.match(r" line (\d+):(.*)", rest)
    if m:
        return f"{source}: line {m[1]}: {label}:{m[2]}"
    return f"{source}: line {line}: {label}:{rest}"




def _documents(text: str, source: str) -> list[tuple[str, int]]:
    """Each YAML document as text padded to its place in the file (so parse errors and the line map
    give the file's line numbers), with its first line."""
    docs = []
    start = None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.DocumentStartEvent):
                start = event.start_mark
            elif isinstance(event, yaml.DocumentEndEvent) and start is not None:
                body = text[start.index:event.end_mark.index]
                docs.append(("\n" * start.line + " " * start.column + body, start.line + 1))
                start = None
    except RecursionError:
        raise MoergeError(f"{source}: the YAML is nested too deeply to be a recipe; fix its structure") from None
    except yaml.YAMLError as e:
        raise yaml_error(e, source) from None
    return docs


def _sites(r: Recipe, lines: dict[tuple, int]) -> list[Site]:
    refs: list[tuple[tuple, str]] = []
    if r.base_model:
        refs.append((("base_model",), r.base_model))
    for i, m in enumerate(r.models or []):
        refs.append((("models", i, "model"), m.model))
    for i, s in enumerate(r.slices or []):
        for j, src in enumerate(s.sources):
            refs.append((("slices", i, "sources", j, "model"), src.model))
        if s.base_model:
            refs.append((("slices", i, "base_model"), s.base_model))
    if r.tokenizer_source not in (None, "base", "union"):
        refs.append((("tokenizer_source",), r.tokenizer_source))
    src = r.tokenizer.get("source") if isinstance(r.tokenizer, dict) else None
    if isinstance(src, str) and src not in ("base", "union"):
        refs.append((("tokenizer", "source"), src))
    return [Site(p, ref, lines.get(p) or lines.get(p[:-1])) for p, ref in refs]


def parse(text: str, source: str = "<recipe>") -> "Recipe | MultiRecipe":
    """A recipe file's text: one document is a Recipe (exactly as ``parse_recipe``), several are a
    MultiRecipe, checked as a whole (names, references, cycles, the final output)."""
    docs = _documents(text, source)
    parsed: list[tuple[str, int, Any]] = []
    for doc, first in docs:
        try:
            data = yaml.safe_load(doc)
        except (yaml.YAMLError, RecursionError):
            data = ...  # parse_recipe reports it
        if data is not None:
            parsed.append((doc, first, data))
    if len(parsed) <= 1:
        return parse_recipe(text if len(docs) <= 1 or not parsed else parsed[0][0], source)
    stages: list[Stage] = []
    for index, (doc, first, data) in enumerate(parsed):
        lines = _line_map(doc)
        name = data.get("name") if isinstance(data, dict) else None
        line = lines.get(("name",)) or lines.get(()) or first
        label = (f"stage {name!r}" if not name.isprintable() else f"stage '{name}'") if isinstance(name, str) else \
            "the unnamed final stage"
        try:
            recipe = parse_recipe(doc, source)
        except MoergeError as e:
            raise MoergeError(_in_stage(str(e), source, label, line)) from None
        stages.append(Stage(recipe.name, recipe, line, index, _sites(recipe, lines)))
    return _link(stages, source)


def _link(stages: list[Stage], source: str) -> MultiRecipe:
    """Check the names, resolve references to stages, order the stages and find the final one."""
    by_name: dict[str, Stage] = {}
    unnamed: Stage | None = None
    for s in stages:
        if s.name is None:
            if unnamed is not None:
                raise MoergeError(f"{_where(source, s.line)} this document has no name:, and neither has the one at line "
                                  f"{unnamed.line}; only the final stage may go unnamed (as in mergekit): name the others")
            unnamed = s
            continue
        if not NAME_OK.fullmatch(s.name):
            raise MoergeError(f"{_where(source, s.line)} name: {s.name!r} cannot name a stage (it becomes a model reference "
                              "and a folder name under --keep-intermediates); use letters, digits, '-', '_' and '.'")
        if s.name in by_name:
            raise MoergeError(f"{_where(source, s.line)} name: {s.name!r} is also the name of the stage at line "
                              f"{by_name[s.name].line}; give each stage its own name")
        by_name[s.name] = s
    for s in stages:
        for site in s.sites:
            model, rev, _ = split_ref(site.ref)
            if model in by_name:
                if rev is not None:
                    raise MoergeError(f"{_where(source, site.line, s)} {site.key}: {site.ref!r}: stage '{model}' is merged "
                                      f"here and has no revisions; write {model}")
                site.stage = model
    _refuse_cycles(stages, by_name, source)
    sinks = [s for s in stages if s.name is None or not any(s.name in t.uses for t in stages)]
    if unnamed is not None:
        final = unnamed
    elif len(sinks) == 1:
        final = sinks[0]
    else:
        a, b = sinks[0], sinks[1]
        raise MoergeError(f"{_where(source, b.line)} stages '{a.name}' (line {a.line}) and '{b.name}' (line {b.line}) are "
                          "both final: no stage uses them, and OUT holds one merge; make a stage use one, remove one, or "
                          "drop name: from the one OUT should hold (the others are then kept with --keep-intermediates)")
    return MultiRecipe(source, _order(stages, final))


def _refuse_cycles(stages: list[Stage], by_name: dict[str, Stage], source: str) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in by_name[name].uses:
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[name] = 2
        path.pop()
        return None

    for s in stages:
        if s.name is not None and s.name not in state:
            cycle = visit(s.name)
            if cycle:
                first = by_name[cycle[0]]
                site = next(x for x in first.sites if x.stage == cycle[1])
                if len(cycle) == 2:
                    raise MoergeError(f"{_where(source, site.line, first)} {site.key}: uses its own output; a stage cannot "
                                      "be its own input")
                chain = ", ".join(f"{a} uses {b}" for a, b in zip(cycle, cycle[1:]))
                raise MoergeError(f"{_where(source, site.line, first)} {site.key}: the stages form a cycle ({chain}); "
                                  "each stage may only use stages that do not use it")


def _order(stages: list[Stage], final: Stage) -> list[Stage]:
    """Dependency order, file order among stages that are ready together; the final stage last."""
    done: set[str] = set()
    left = list(stages)
    order: list[Stage] = []
    while left:
        ready = [s for s in left if all(u in done for u in s.uses)]
        pick = next((s for s in ready if s is not final), ready[0])
        order.append(pick)
        left.remove(pick)
        if pick.name is not None:
            done.add(pick.name)
    return order


def from_list(items: list, source: str = "<recipe>") -> MultiRecipe | Recipe:
    """Several recipes given in Python (dicts or Recipes), as if they were the documents of one file."""
    docs = []
    for i, item in enumerate(items):
        if isinstance(item, Recipe):
            docs.append(item.to_yaml())
            continue
        if not isinstance(item, dict):
            raise MoergeError(f"{source}: item {i} of the recipe list is {type(item).__name__}; give each stage as a "
                              "dict or a Recipe")
        docs.append(recipe_yaml(item, f"{source}: item {i}"))
    if not docs:
        raise MoergeError(f"{source}: the recipe list is empty; give at least one recipe")
    return parse("---\n".join(docs), source)


def load(path: str | os.PathLike) -> "Recipe | MultiRecipe":
    """A recipe file with one or several documents."""
    return parse(read_recipe_text(path), str(path))


# ---------------------------------------------------------------------- planning

class ExpectedOutput:
    """A stage's output before it exists, as a tensor source: the names, shapes and dtypes its plan
    will write. Planning a later stage on it checks everything but the bytes."""

    def __init__(self, plan: "Plan", name: str):
        self.path = Path(name)
        self._infos = {t.name: TensorInfo(t.name, t.out_dtype, tuple(t.shape), self.path, 0, t.nbytes) for t in plan.tasks}

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str):
        try:
            return self._infos[name]
        except KeyError:
            raise MoergeError(f"{self.path}: has no tensor {name!r}") from None

    def get(self, name: str):
        raise MoergeError(f"{self.path}: stage output not merged yet (tensor {name!r})")


@dataclass
class StagePlan:
    """A stage as planned before anything runs: ``plan`` is None when it can only be planned once
    ``waits_for`` has run (it applies an adapter to that stage's output)."""

    stage: Stage
    plan: "Plan | None"
    expected: bool = False  # planned on earlier stages' expected outputs
    waits_for: str | None = None
    adapter: bool = False  # it waits because it applies an adapter to ``waits_for``'s output


@dataclass
class MultiPlan:
    """Every stage of a multi-document recipe, checked and planned, in run order (the last writes OUT)."""

    recipe: MultiRecipe
    stages: list[StagePlan]
    notes: list[str] = field(default_factory=list)
    opened: dict[str, "Model"] = field(default_factory=dict, repr=False)  # inputs opened while planning

    @property
    def final(self) -> StagePlan:
        return self.stages[-1]

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def summary(self) -> str:
        n = len(self.stages)
        lines = [f"stages: {' -> '.join(sp.stage.title for sp in self.stages)}  ({n}, in run order; the last writes OUT)"]
        for i, sp in enumerate(self.stages, 1):
            s = sp.stage
            head = f"[{i}/{n}] {s.label} (line {s.line})"
            if s.uses:
                head += f", uses {', '.join(s.uses)}"
            if sp.plan is None:
                head += (f": checked (YAML, method, parameters, references, its other inputs); planned once "
                         f"{sp.waits_for} has run" + (" (an adapter is applied to its output)" if sp.adapter else ""))
            elif sp.expected:
                head += ": planned on the expected output of " + ", ".join(s.uses)
            lines.append(head)
            if sp.plan is not None:
                lines += ["  " + line for line in sp.plan.summary().splitlines()]
        return "\n".join(lines + self.notes)


def _open_external(site: Site, stage: Stage, recipe: MultiRecipe, library) -> "Model":
    try:
        return open_model(site.ref, library)
    except MoergeError as e:
        names = recipe.names()
        model = split_ref(site.ref)[0]
        close = difflib.get_close_matches(model, names, n=1, cutoff=0.6)
        at = f"{_where(recipe.source, site.line, stage)} {site.key}:"
        if close or "/" not in model:
            hint = f"did you mean stage '{close[0]}'?" if close else "name a stage or fix the path"
            raise MoergeError(f"{at} {site.ref!r} is neither a stage of this file (stages: {', '.join(names)}) nor a "
                              f"model ({str(e).split('; ')[0]}); {hint}") from None
        raise MoergeError(f"{at} {e}") from None


def _build(stage: Stage, recipe: Recipe, models: dict, library, source: str) -> "Plan":
    try:
        return Planner(recipe, models=models, library=library).build()
    except MoergeError as e:
        raise MoergeError(f"{_where(source, stage.line, stage)} {e}") from None


def _expected_model(name: str, plan: "Plan", scratch: Path) -> "Model":
    """The Model a later stage will open for ``name``'s output, from its plan: its config, and a
    folder holding the tokenizer it will have (the one its plan copies, or the one it builds)."""
    folder = plan.tokenizer_from.folder if plan.tokenizer_from is not None else scratch / name
    built = plan.alignment.tokenizer if plan.alignment is not None else None
    if built is not None:
        folder = scratch / name
        built.save_pretrained(folder)
    return Model(name, folder, ExpectedOutput(plan, name), dict(plan.config or {}))


def _seeded(r: Recipe, seed: int | None) -> Recipe:
    return r if seed is None else r.model_copy(update={"seed": seed})


def plan_stages(recipe: MultiRecipe, *, seed: int | None = None, library: str | os.PathLike | None = None,
                keep: bool | None = None) -> MultiPlan:
    """Check every stage and plan it; later stages on the earlier ones' expected outputs. ``keep``:
    whether intermediate outputs are kept (--keep-intermediates); when False, a named stage no stage
    uses is refused (its merge would be thrown away); None only notes it."""
    source = recipe.source
    opened: dict[str, Any] = {}
    for stage in recipe.stages:  # every model outside the chain first: a misspelt stage name shows here
        for site in stage.sites:
            if site.stage is None and site.ref not in opened:
                opened[site.ref] = _open_external(site, stage, recipe, library)
    unused = recipe.unused()
    if unused and keep is False:
        s = unused[0]
        raise MoergeError(f"{_where(source, s.line, s)} no stage uses it and it is not the final output "
                          f"({recipe.final.label}, line {recipe.final.line}), so its merge would be thrown away; remove "
                          "it, use it, or pass --keep-intermediates DIR to keep it")
    expected: dict[str, Any] = {}
    out: list[StagePlan] = []
    with tempfile.TemporaryDirectory(prefix="moerge-plan-") as scratch:
        for stage in recipe.stages:
            models = dict(opened)
            waits = None
            for site in stage.sites:
                if site.stage is None:
                    continue
                dep = expected.get(site.stage)
                if dep is None or site.ref != site.stage:  # NAME+adapter: the adapter is checked against the real output
                    waits = (site.stage, site.ref != site.stage)
                    break
                models[site.ref] = dep
            if waits is not None:
                out.append(StagePlan(stage, None, waits_for=waits[0], adapter=waits[1]))
                continue
            plan = _build(stage, _seeded(stage.recipe, seed), models, library, source)
            out.append(StagePlan(stage, plan, expected=bool(stage.uses)))
            if stage.name is not None and stage is not recipe.final:
                expected[stage.name] = _expected_model(stage.name, plan, Path(scratch))
    notes = [f"note: {s.label} is used by no stage and is not the final output: it is kept only with "
             "--keep-intermediates" for s in unused] if keep is None else []
    return MultiPlan(recipe, out, notes, opened)


# ---------------------------------------------------------------------- running

def _open_output(site: Site, folder: Path, library) -> "Model":
    """A stage's finished output, opened under the name it is referred to by (``a``, ``a+adapter``)."""
    source = open_source(folder)
    model = Model(site.ref, folder, source, _read_config(folder))
    _, _, lora = split_ref(site.ref)
    if lora:
        lname, lrev, _ = split_ref(lora)
        lora_dir = resolve_ref(lname, lrev)
        model.source = ExpertAppliedSource(source, load_adapter(lora_dir, source), str(lora_dir))
        model.lora = lora_dir
        model.pinned = f"{site.stage}+{_pinned(lora, lora_dir)}"
    return model


def _check_outputs(recipe: MultiRecipe, mp: MultiPlan, out_dir: Path, keep: Path | None, overwrite: bool,
                   lazy: bool = False) -> None:
    """Everything about the output folders, before any stage runs."""
    if out_dir.exists() and not overwrite:
        raise MoergeError(f"{out_dir}: already exists; choose another folder or pass --overwrite")
    plans = [sp.plan for sp in mp.stages if sp.plan is not None]
    for plan in plans:
        _check_output(plan, out_dir)
    if keep is None:
        return
    out, kept = out_dir.resolve(), keep.resolve()
    if kept == out or kept.is_relative_to(out):
        raise MoergeError(f"--keep-intermediates {keep}: is (or is inside) OUT {out_dir}, which is replaced by the final "
                          "merge; keep the intermediates elsewhere")
    for s in recipe.stages[:-1]:
        dest = keep / s.name
        if dest.resolve() == out or out.is_relative_to(dest.resolve()):
            raise MoergeError(f"{out_dir}: is where --keep-intermediates puts {s.label}; choose another OUT or DIR")
        if dest.exists() and not overwrite and not lazy:
            raise MoergeError(f"{dest}: already exists (--keep-intermediates keeps {s.label} there); remove it, choose "
                              "another DIR, pass --lazy to reuse it, or --overwrite")
        for plan in plans:
            _check_output(plan, dest)


def _lazy_needs_keep(lazy: bool, keep) -> None:
    if lazy and keep is None:
        raise MoergeError("--lazy reuses intermediate outputs kept by an earlier run, so it needs --keep-intermediates DIR "
                          "(the folder that run kept them in)")


def check_outputs(mp: MultiPlan, out_dir, keep, overwrite: bool = False, lazy: bool = False) -> None:
    """What a run would refuse about its output folders (``--dry-run`` checks it too)."""
    _lazy_needs_keep(lazy, keep)
    _check_outputs(mp.recipe, mp, Path(out_dir), Path(keep) if keep is not None else None, overwrite, lazy)
    if lazy:
        kept = [s.name for s in mp.recipe.stages[:-1] if (Path(keep) / s.name).exists()]
        if kept:
            mp.notes.append(f"note: --lazy: kept output(s) {', '.join(kept)} in {keep} are reused if their saved recipe "
                            "and inputs' fingerprints still match (checked when the stage runs)")


def _kept_same(dest: Path, plan: "Plan", expected: str, stage: Stage, overwrite: bool, source: str) -> bool:
    """--lazy: whether the kept output in ``dest`` is this stage's merge: its saved recipe is the one the
    stage would write, its card records the inputs' current fingerprints (an input changed on disk
    since is not reused), and its weights open."""
    saved, card = dest / "moerge_recipe.yaml", dest / "README.md"
    why = None
    if not saved.is_file():
        why = "has no moerge_recipe.yaml"
    elif saved.read_text(encoding="utf-8", errors="replace") != expected:
        why = "holds another merge (its moerge_recipe.yaml differs)"
    else:
        text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
        changed = next((m for m in lineage(plan) if m["fingerprint"] not in text), None)
        if changed is not None:
            why = f"was merged from another {changed['model']} (its fingerprint is now {changed['fingerprint']})"
        else:
            try:
                open_source(dest)
            except MoergeError as e:
                why = f"cannot be read ({e})"
    if why is None:
        return True
    if overwrite:
        return False
    raise MoergeError(f"{_where(source, stage.line, stage)} {dest}: {why}, so --lazy cannot reuse it for {stage.label}; "
                      "remove it, or pass --overwrite to merge it again")


def _scratch_root(out_dir: Path) -> Path:
    """A hidden temporary folder beside OUT (the same disk: intermediates are as large as models)."""
    parent = out_dir.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        return Path(tempfile.mkdtemp(prefix=".moerge-stages-", dir=parent))
    except OSError as e:
        raise MoergeError(f"{parent}: cannot make a temporary folder for the intermediate stages there ({e.strerror}); "
                          "pass --keep-intermediates DIR to put them elsewhere") from None


def run_stages(recipe: MultiRecipe, out_dir: str | os.PathLike, *, keep_intermediates: str | os.PathLike | None = None,
               overwrite: bool = False, seed: int | None = None, workers: int | None = None, shard_size: str | int = "5B",
               progress: bool = False, library: str | os.PathLike | None = None,
               on_stage: Callable[[int, int, Stage, Path], None] | None = None, lazy: bool = False,
               device=None) -> "MergeResult":
    """Run every stage in dependency order; intermediate outputs go to a temporary folder removed
    afterwards (or ``keep_intermediates/NAME``), and only the final stage writes ``out_dir`` (atomically).
    Its card and ``moerge_recipe.yaml`` record every stage it depends on, pinned.

    ``lazy`` (mergekit-multi's ``--lazy``): an intermediate already kept in ``keep_intermediates/NAME``
    is reused instead of merged again, when its saved ``moerge_recipe.yaml`` is exactly what this stage
    would write (same inputs as written, same parameters, same earlier stages); a kept output of another
    recipe is refused (or, with ``overwrite``, merged again)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    keep = Path(keep_intermediates) if keep_intermediates is not None else None
    _lazy_needs_keep(lazy, keep)
    parse_size(shard_size)
    mp = plan_stages(recipe, seed=seed, library=library, keep=keep is not None)
    _check_outputs(recipe, mp, out_dir, keep, overwrite, lazy)
    root = keep if keep is not None else _scratch_root(out_dir)
    records: dict[str, StageRecord] = {}
    source = recipe.source
    try:
        for i, stage in enumerate(recipe.stages):
            final = stage is recipe.final
            dest = out_dir if final else root / stage.name
            models = dict(mp.opened)
            for site in stage.sites:
                if site.stage is not None:
                    try:
                        models[site.ref] = _open_output(site, (root / site.stage).absolute(), library)
                    except MoergeError as e:
                        raise MoergeError(f"{_where(source, site.line, stage)} {site.key}: {e}") from None
            plan = _build(stage, _seeded(stage.recipe, seed), models, library, source)
            earlier = [records[s.name] for s in recipe.needs(stage)]
            if earlier:
                plan.chain = earlier  # read by card.write_extras: the card and saved recipe record the whole chain
            reuse = lazy and not final and dest.exists() and _kept_same(dest, plan, saved_recipe(plan), stage, overwrite,
                                                                          source)
            if on_stage is not None:
                on_stage(i, len(recipe.stages), stage, dest)
            elif progress:  # one plain line per stage, as every long command prints per phase
                print(f"[{i + 1}/{len(recipe.stages)}] {stage.label} -> {dest}" + (" (kept, reused: --lazy)" if reuse else ""),
                      file=sys.stderr, flush=True)
            if not reuse:
                try:
                    res = execute(plan, dest, overwrite=overwrite, workers=workers, shard_size=shard_size, progress=progress,
                                  device=device)
                except MoergeError as e:
                    raise MoergeError(f"{_where(source, stage.line, stage)} {e}") from None
            if not final:
                records[stage.name] = StageRecord(stage.name, plan.pinned_recipe, plan.method.pretty or plan.method.name,
                                                  lineage(plan))
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return MergeResult(res.out_dir, res.tensors, res.bytes_written, time.perf_counter() - start, len(recipe.stages))
