"""Merge search: gradient-free optimisation of a recipe's weights, densities and other numbers.

``search(recipe, tasks=..., budget=N)`` asks a nevergrad optimiser (NGOpt by default, or CMA-ES, ...)
for candidate values of the recipe's knobs (``space.knobs``), merges each candidate in memory with the
merge engine (``engine.executor.merge_tensors``; nothing is written), scores it by exact match on the
tasks' *validation* split, and tells the optimiser. The recipe as written is the first candidate, so
the result is never worse than it on the search's own score. The best recipe and the default are then
both scored on the *test* split, which the search never saw: that is the number to believe.

With ``ray`` the candidates of a round (``workers`` at a time) run as Ray tasks, each merging and
scoring in its own process on one core (``moerge.util.scale``), as mergekit-evolve spreads candidates
over GPUs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moerge.engine.dense import model_from_tensors
from moerge.engine.executor import merge_tensors
from moerge.engine.multi import MultiRecipe
from moerge.engine.plan import Plan
from moerge.engine.run import load_recipe
from moerge.engine.run import plan as plan_recipe
from moerge.engine.stats import gather
from moerge.errors import MoergeError
from moerge.eval import evaluate, resolve_tasks
from moerge.lm.device import named, send_module
from moerge.methods import registry
from moerge.search.space import Knob, apply, knobs, value_at
from moerge.util.files import atomic_file
from moerge.util.scale import Runner

OPTIMIZERS = ("NGOpt", "CMA", "TwoPointsDE", "PSO", "OnePlusOne", "RandomSearch")


@dataclass
class SearchResult:
    best: dict  # the best recipe found (a dict, as YAML reads it)
    default: dict  # the recipe as given
    best_score: float  # mean validation exact match
    default_score: float
    best_test: dict[str, float]  # per task, on the test split
    default_test: dict[str, float]
    knobs: list[Knob]
    history: list[dict] = field(default_factory=list)  # {"values": {label: v}, "score": s} per candidate
    merges: int = 0  # distinct candidates merged and scored (the optimiser may propose a point twice)
    seconds: float = 0.0

    def yaml(self) -> str:
        return yaml.safe_dump(self.best, sort_keys=False)


def score_recipe(recipe: dict, tasks: list[str], n: int, split: str = "validation", library: str | None = None,
                 threads: int | None = None, stats=None) -> dict:
    """Merge ``recipe`` in memory and score it: {"mean", "scores"}. Runs here or in a Ray worker."""
    import torch
    from transformers import AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    plan = plan_recipe(recipe, library=library)
    if not isinstance(plan, Plan):
        raise MoergeError("merge search takes a one-stage merge recipe (not a multi-document recipe or an MoE config)")
    if plan.config is None:
        raise MoergeError(f"{plan.config_from.ref}: has no config.json, so a candidate merge cannot be run to score it")
    if stats is not None:
        plan.stats = stats
    where = named()  # a device the user named: each candidate is merged and scored there
    model = send_module(model_from_tensors(plan.config, merge_tensors(plan, device=where)), where)
    if plan.alignment is not None and plan.alignment.tokenizer is not None:
        tok = plan.alignment.tokenizer
    else:
        tok = AutoTokenizer.from_pretrained(str((plan.tokenizer_from or plan.config_from).folder))
    scores = evaluate(model, tok, tasks, n=n, split=split)
    return {"mean": sum(scores.values()) / len(scores), "scores": scores}


def _job(recipe: dict, tasks: list[str], n: int, split: str, library: str | None, stats, threads: int | None) -> dict:
    return score_recipe(recipe, tasks, n, split, library, threads, stats)


def search(recipe, *, tasks, budget: int = 30, n: int = 50, params: list[str] | None = None, optimizer: str = "NGOpt",
           seed: int = 0, ray: bool | str | None = None, workers: int = 2, library=None, n_test: int | None = None,
           progress: bool = False) -> SearchResult:
    """Search the recipe's numeric parameters (``params``: those names only) for the best mean exact
    match on ``tasks`` (validation split, ``n`` prompts each) within ``budget`` candidate merges."""
    check_search(budget, optimizer)
    names = resolve_tasks(tasks)
    r = load_recipe(recipe)
    if isinstance(r, MultiRecipe) or not hasattr(r, "merge_method"):
        raise MoergeError("merge search takes a one-stage merge recipe (not a multi-document recipe or an MoE config)")
    default = yaml.safe_load(r.to_yaml())
    chosen = knobs(default, registry.get(r.merge_method), params)
    plan0 = plan_recipe(default, library=library)  # every input and parameter checked before any candidate runs
    lib = str(library) if library is not None else None
    stats = None
    if plan0.method.stats:  # Fisher, RegMean: each input's statistics once, not once per candidate

        stats = gather(plan0, progress)
    start = time.perf_counter()

    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    say(f"searching {len(chosen)} parameter(s) ({', '.join(k.label for k in chosen)}) with {optimizer}, "
        f"{budget} candidates, scored on {n} validation prompts of {', '.join(names)}")
    runner = Runner(_job, ray)
    parallel = max(1, workers) if runner.ray is not None else 1
    opt = make_optimizer(chosen, budget=budget, optimizer=optimizer, seed=seed, workers=parallel)
    history: list[dict] = []
    seen: dict[tuple, dict] = {}  # knob values (as applied, rounded) -> their score
    best_values, best_score = [k.value for k in chosen], None
    default_score = None
    import warnings

    try:
        while len(history) < budget:
            cands = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the optimisers' advisory warnings about their own settings
                for _ in range(min(parallel, budget - len(history))):
                    cands.append(opt.ask())
            jobs = [{"recipe": apply(default, chosen, c.value), "tasks": names, "n": n, "split": "validation",
                     "library": lib, "stats": stats} for c in cands]
            keys = [tuple(value_at(j["recipe"], k.path) for k in chosen) for j in jobs]
            fresh = {key: job for key, job in zip(keys, jobs) if key not in seen}  # a point already scored is not merged again
            for key, res in zip(fresh, runner.map(list(fresh.values()))):
                seen[key] = res
            results = [seen[key] for key in keys]
            for c, job, res in zip(cands, jobs, results):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt.tell(c, -res["mean"])
                values = {k.label: value_at(job["recipe"], k.path) for k in chosen}
                history.append({"values": values, "score": res["mean"]})
                if default_score is None:
                    default_score = res["mean"]
                better = best_score is None or res["mean"] > best_score
                if better:
                    best_values, best_score = [values[k.label] for k in chosen], res["mean"]
                say(f"candidate {len(history)}/{budget}: {_fmt(values)} -> {res['mean']:.1%}"
                    + (" (best so far)" if better else ""))
    finally:
        runner.close()
    best = apply(default, chosen, best_values)
    say("scoring the best and the default recipe on the test split")
    n_test = n_test or n
    best_test = score_recipe(best, names, n_test, "test", lib, stats=stats)["scores"]
    default_test = score_recipe(default, names, n_test, "test", lib, stats=stats)["scores"]
    return SearchResult(best, default, best_score, default_score, best_test, default_test, chosen, history, len(seen),
                        time.perf_counter() - start)


def check_search(budget: int, optimizer: str) -> None:
    """nevergrad installed, a budget of at least one candidate, an optimiser it has: one line each."""
    try:
        import nevergrad  # noqa: F401
    except ImportError:
        raise MoergeError("a search needs nevergrad: pip install nevergrad") from None
    if budget < 1:
        raise MoergeError(f"--budget {budget}: give at least 1 candidate to try")
    if optimizer not in OPTIMIZERS:
        raise MoergeError(f"--optimizer {optimizer}: use one of {', '.join(OPTIMIZERS)}")


def make_optimizer(chosen: list[Knob], *, budget: int, optimizer: str, seed: int, workers: int = 1, first=()):
    """A nevergrad optimiser over the knobs' ranges whose first candidates are the values as given, then
    the points ``first`` (its suggestions are asked last-in, first-out)."""
    import nevergrad as ng

    start = [min(k.high, max(k.low, k.value)) for k in chosen]
    param = ng.p.Array(init=start, lower=[k.low for k in chosen], upper=[k.high for k in chosen])
    param.random_state.seed(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget, num_workers=workers)
    for point in reversed(list(first)):
        opt.suggest(list(point))
    opt.suggest(start)
    return opt


def _fmt(values: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in values.items())


def write_recipe(result: SearchResult, path: str | Path) -> Path:
    """The best recipe as YAML, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(result.yaml())
    return Path(path)
