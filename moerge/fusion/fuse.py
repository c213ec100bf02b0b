"""One fusion round: the contributions made on a library's latest base, merged into its next base.

ColD Fusion's step (Don-Yehiya et al., 2023) is the plain average of the contributors' fine-tuned
models; any merge method of the engine can stand in for it (``ties``, ``task_arithmetic``, ...). The
merge goes through the engine, so it streams tensor by tensor and the new base folder appears only
when complete; the library registers it as ``base@N+1`` in one transaction afterwards, with a card
recording its lineage. A crash at any point leaves at most an unregistered folder, which the next
fusion replaces.

Contributions are library experts (adapters or full fine-tunes) made on the latest base. Tensors a
contributor should not change (a shared head, the embeddings) can be excluded by name patterns: the
contributions' changes to them are dropped before merging, so the new base keeps the old tensors.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from moerge.engine.executor import execute
from moerge.engine.plan import Model, Planner, _read_config
from moerge.engine.run import load_recipe
from moerge.errors import MoergeError
from moerge.eval import evaluate, resolve_tasks
from moerge.experts.peft_format import ExpertAppliedSource
from moerge.io.fingerprint import fingerprint
from moerge.library import Library
from moerge.lm import base as base_model
from moerge.lm.device import named
from moerge.methods import registry

ALIASES = {"average": "linear", "mean": "linear"}  # ColD Fusion's plain average is mergekit's linear
CARD = "moerge_fusion.json"


@dataclass
class FusePlan:
    library: object  # moerge.library.Library
    parent: object  # the BaseVersion the contributions were made on
    contributions: list  # library Entries
    method: str
    parameters: dict
    exclude: list[str]
    excluded: list[str]  # base tensor names the patterns matched
    plan: object  # the engine's Plan
    out: Path
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"fuse: {len(self.contributions)} contribution(s) on {self.parent.ref} -> base@{self.parent.version + 1}",
                 f"method: {self.method}" + (f" {json.dumps(self.parameters)}" if self.parameters else ""),
                 "contributions: " + ", ".join(f"{e.ref} ({e.kind}, {e.task or 'no task'})" for e in self.contributions)]
        if self.exclude:
            lines.append(f"excluded: {len(self.excluded)} tensor(s) kept from {self.parent.ref} ({', '.join(self.exclude)})")
        lines.append(f"output: {self.out}")
        return "\n".join(lines + self.notes)


def contributions(lib, refs: list[str] | None = None) -> tuple[object, list]:
    """The latest base and the experts to fuse: those named (each must be made on the latest base), or
    by default each name's newest version made on it."""
    parent = lib.base()
    if refs is not None:
        if not refs:
            raise MoergeError("--experts: empty; give NAME[@V] references, comma-separated, or leave it out to fuse every "
                              f"contribution on {parent.ref}")
        twice = next((r for i, r in enumerate(refs) if r in refs[:i]), None)
        if twice:
            raise MoergeError(f"--experts: {twice} is given twice; each contribution is fused once")
        entries = []
        for r in refs:
            e = lib.get(r.removeprefix("library://"))
            if e.base_version != parent.version:
                raise MoergeError(f"{e.ref}: was made on base@{e.base_version}, but fusing makes base@{parent.version + 1} "
                                  f"from contributions on {parent.ref}; rebase it (moerge expert rebase {e.ref}) or leave it out")
            entries.append(e)
    else:
        newest: dict = {}  # each name's newest version made on the latest base
        for e in lib.experts(base_version=parent.version):
            newest[e.name] = e
        entries = list(newest.values())
    if not entries:
        raise MoergeError(f"{lib.root}: has no contributions on {parent.ref} to fuse; add experts made on {parent.path} "
                          "(moerge library add)")
    seen: dict[str, str] = {}
    for r, e in zip(refs or [e.ref for e in entries], entries):
        if e.ref in seen:
            raise MoergeError(f"--experts: {seen[e.ref]} and {r} are both {e.ref}; each contribution is fused once")
        seen[e.ref] = r
    return parent, entries


def _excluded(patterns: list[str], names: list[str]) -> list[str]:
    hit: list[str] = []
    for p in patterns:
        found = [n for n in names if fnmatch.fnmatchcase(n, p)]
        if not found:
            example = next((n for n in names if ".layers." in n), names[0] if names else "")
            raise MoergeError(f"--exclude {p!r}: matches no tensor of the base; names look like {example} (shell-style "
                              "patterns: * and ?)")
        hit += [n for n in found if n not in hit]
    return hit


def check_method(method: str) -> str:
    """The engine's name for a fusion method (average is linear), or one line naming the choices."""
    name = ALIASES.get(method, method)
    if name not in registry.names():
        raise MoergeError(f"--method {method!r}: unknown merge method; use average or one of {', '.join(registry.names())}")
    return name


def fusion_recipe(name: str, refs: list[str], parent, params: dict):
    """The engine recipe that fuses ``refs`` (the contributions) made on the ``parent`` base folder by
    ``name``, checked; a value the user gave that the engine refuses is told as the option it came from."""
    method = registry.get(name)
    for key in params:  # a recipe only warns of a parameter its method ignores; a fusion writes a base with it
        if method.param(key) is None:
            takes = ", ".join(p.name for p in method.params) or "no parameters"
            raise MoergeError(f"--param {key}: {name} does not use it (it takes {takes}); a fusion with it would "
                              "write a base that ignores it")
    # each contribution counts alike: weight 1/K (the average; task arithmetic then adds the mean delta),
    # for the methods that take a weight
    weight = {} if "weight" in params or method.param("weight") is None else {"parameters": {"weight": 1.0 / len(refs)}}
    recipe = {"merge_method": name, "models": [{"model": r, **weight} for r in refs]}
    if method.base != "ignored":  # the reference point of the methods that read one (task vectors, slerp, ...);
        recipe["base_model"] = str(parent)  # one that ignores it (linear, RegMean, Fisher) would take it as an input
    if params:
        recipe["parameters"] = params
    try:
        return load_recipe(recipe)
    except MoergeError as e:  # the recipe is ours: point at the option the value came from
        raise MoergeError(_as_option(str(e), params)) from None


def plan_fuse(library, *, method: str = "average", experts: list[str] | None = None, exclude: list[str] | tuple = (),
              parameters: dict | None = None, eval_tasks: str | list[str] | None = None, n_eval: int = 100) -> FusePlan:
    """Check everything and plan the merge of the contributions into the next base (nothing written)."""
    lib = library if isinstance(library, Library) else Library.open(library)
    name = check_method(method)
    if eval_tasks:

        resolve_tasks(eval_tasks)  # an unknown task fails now, before the merge (and in --dry-run)
        if n_eval < 1:
            raise MoergeError(f"--n-eval must be at least 1, got {n_eval}")
    parent, entries = contributions(lib, experts)
    base_src = lib.base_source(parent.version)
    excluded = _excluded(list(exclude), base_src.names())
    params = dict(parameters or {})
    refs = [f"library://{e.ref}" for e in entries]
    r = fusion_recipe(name, refs, parent.path, params)
    models = {}
    for e, ref in zip(entries, refs):
        x = lib.load(e.ref)
        if excluded:
            x.updates = {k: v for k, v in x.updates.items() if k not in set(excluded)}
        models[ref] = Model(ref, parent.path, ExpertAppliedSource(base_src, x, ref), _read_config(parent.path), None, ref,
                            e.card)  # its card names its data: what data-aware methods weigh it by
    try:
        plan = Planner(r, models=models, library=lib.root).build()
    except MoergeError as e:
        raise MoergeError(_as_option(str(e), params)) from None
    out = lib.root / "bases" / f"v{parent.version + 1}"  # no '@' in the path: refs read NAME@REV
    fp = FusePlan(lib, parent, entries, name if method not in ALIASES else method, params, list(exclude), excluded, plan, out)
    if name == "linear" and len(entries) == 1:
        fp.notes.append("note: one contribution: the new base is that contribution applied to the base")
    fp.notes += merged_twice(entries)
    return fp


def merged_twice(entries: list) -> list[str]:
    """Warnings for a contribution merged from others fused beside it (``expert merge``): their skills
    would count twice in the new base."""
    refs = {f"library://{e.ref}" for e in entries}
    lines = []
    for e in entries:
        inputs = ((e.card.get("extra") or {}).get("merged_from") or {}).get("inputs") or []
        also = [p["ref"].removeprefix("library://") for p in inputs if p.get("ref") in refs]
        if also:
            lines.append(f"warning: {e.ref} was merged from {', '.join(also)}, fused beside it: their skills count twice; "
                         f"leave one side out with --experts")
    return lines


def _as_option(message: str, params: dict) -> str:
    """An engine message about the recipe fuse wrote, told in terms of the options the user gave."""
    import re

    m = re.search(r"parameters\.(\w+): (.*)$", message)
    if m and m.group(1) in params:
        return f"--param {m.group(1)}={params[m.group(1)]}: {m.group(2)}"
    return re.sub(r"^<recipe>(: line \d+)?: ", "", message)


@dataclass
class FuseResult:
    base: object  # the new BaseVersion
    plan: FusePlan
    seconds: float


def fuse(library, *, method: str = "average", experts: list[str] | None = None, exclude: list[str] | tuple = (),
         parameters: dict | None = None, scores: dict | None = None, progress: bool = False,
         workers: int | None = None, eval_tasks: str | list[str] | None = None, n_eval: int = 100,
         device: str | None = None) -> FuseResult:
    """Fuse the contributions on the latest base into ``base@N+1`` and register it (see the module doc).
    ``scores``: evaluation results to record in the new base's card (``fuse simulate`` passes them);
    ``eval_tasks``: score the new base and its parent on these tasks (exact match, ``n_eval`` test
    prompts each) and record both in the card. ``device``: where the merge computes each tensor (None:
    the ``--device`` the user named, else the CPU), as ``moerge merge``."""
    start = time.perf_counter()
    fp = plan_fuse(library, method=method, experts=experts, exclude=exclude, parameters=parameters,
                   eval_tasks=eval_tasks, n_eval=n_eval)
    if eval_tasks:

        eval_tasks = resolve_tasks(eval_tasks)
    lib, out = fp.library, fp.out
    registered = {b.path.resolve() for b in lib.bases()}
    stale = out.exists() and out.resolve() not in registered  # left by a fusion that crashed before registering
    out.parent.mkdir(parents=True, exist_ok=True)
    execute(fp.plan, out, overwrite=stale, workers=workers, progress=progress, device=named(device))
    card = {
        "version": fp.parent.version + 1, "parent": fp.parent.version, "parent_fingerprint": fp.parent.fingerprint,
        "method": fp.method, "parameters": fp.parameters, "exclude": fp.exclude, "excluded_tensors": len(fp.excluded),
        "contributions": [{"expert": e.ref, "kind": e.kind, "task": e.task, "contributor": e.contributor,
                           "digest": e.digest, "fingerprint": fingerprint(m.source)}
                          for e, m in zip(fp.contributions, fp.plan.models)],
        "scores": scores or {}, "fused": time.time(),
    }
    try:
        if eval_tasks:
            card["scores"] = dict(card["scores"]) | {"zero_shot": _score(out, eval_tasks, n_eval),
                                                     "parent_zero_shot": _score(fp.parent.path, eval_tasks, n_eval)}
        (out / CARD).write_text(json.dumps(card, indent=2) + "\n")
        new = lib.register_base(out, card, fp.parent.version)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # unregistered: nothing half-registered stays behind
        raise
    return FuseResult(new, fp, time.perf_counter() - start)


def _score(folder: Path, tasks: list[str], n: int) -> dict[str, float]:
    model, tok = base_model.load(folder)
    return evaluate(model, tok, tasks, n=n)


def rescore(library, version: int, scores: dict) -> None:
    """Record evaluation results in base@``version``'s card (after the fact, e.g. ``fuse simulate``)."""
    lib = library if isinstance(library, Library) else Library.open(library)
    b = lib.base(version)
    if version == 1:
        raise MoergeError("base@1 is the library's own base; its card is not stored in the catalog")
    card = dict(b.card) | {"scores": dict(b.card.get("scores") or {}) | scores}
    with lib._db(write=True) as db:
        db.execute("UPDATE bases SET card = ? WHERE version = ?", (json.dumps(card), version))
    tmp = b.path / f".{CARD}.{os.getpid()}"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, b.path / CARD)
