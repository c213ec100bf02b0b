"""Scales for LoRA-native merges, searched on the experts' own validation rows.

The subspace merges leave one number to choose, the scale α of the merged change (TIES and DARE a
density), and the papers tune it on validation data: what suits eight ViT tasks does not suit five
LLM skills. A LoRA merge takes about a second, so ``search_lora`` can afford to score each candidate:
the base is loaded once, each candidate's merged change is written into its weights (the originals
kept aside), and the model is scored by exact match on the *validation* rows of the experts' own
tasks (their cards' data: built-in skills, or the held-out rows of their JSONL files). The value as
given is the first candidate, so the result is never worse than it on the search's score; with one
number to tune, four more spread over its range come next, then the optimiser. ``budget`` counts
distinct candidates (values on a grid of about a hundredth of each range, so a point the optimiser
proposes again is not scored twice). The best and the given value are then scored on the *test* rows,
which the search never saw. The merged expert's card records all of it (``merged_from.search``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from moerge.engine.lora_merge import LORA_DEFAULTS, lora_method, merge_lora
from moerge.errors import MoergeError
from moerge.experts.patch import Patched
from moerge.search.space import Knob, knobs

SPLIT = "validation"
MAX_BUDGET = 50  # nevergrad's NGOpt switches to a meta-model at ~100 candidates, which fails on flat scores


def own_tasks(cards: list[dict]) -> list[str]:
    """The tasks the experts were trained on, from their cards: built-in skills by name, a user's JSONL
    file by its path (scored on its held-out rows). One line when a card says nothing usable."""
    from moerge.tasks import skills

    names: list[str] = []
    for card in cards:
        merged = ((card.get("extra") or {}).get("merged_from") or {}).get("inputs")
        if merged and not card.get("data"):  # a merged expert: its inputs' data, as their cards named it
            names += [t for t in own_tasks([{"task": p.get("task"), "data": p.get("data")} for p in merged]) if t not in names]
            continue
        data, task = card.get("data"), card.get("task")
        if data and str(data).startswith("moerge:"):
            found = [t for t in (task or data.removeprefix("moerge:")).split(",") if t]
        elif data and Path(data).is_file():
            found = [str(data)]
        elif task and all(t in skills.SKILLS for t in task.split(",")):
            found = task.split(",")
        else:
            raise MoergeError(f"an expert ({task or 'without a task'}) names no data of its own in its card to search on; "
                              "give the tasks with --tasks (built-in names or JSONL files)")
        names += [t for t in found if t not in names]
    return names


@dataclass
class LoraSearch:
    """What a search found: the chosen values, both scores on both splits, every candidate tried."""

    knobs: list[Knob]
    tasks: list[str]
    n: int
    best: dict[str, float]
    default: dict[str, float]
    best_score: float  # mean validation exact match
    default_score: float
    best_test: dict[str, float]
    default_test: dict[str, float]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict:
        """The card's ``merged_from.search``."""
        mean = lambda s: round(sum(s.values()) / max(1, len(s)), 4)  # noqa: E731
        return {"tuned": [k.name for k in self.knobs], "tasks": self.tasks, "n": self.n, "split": SPLIT,
                "best": self.best, "as_given": self.default,
                "validation": {"best": round(self.best_score, 4), "as_given": round(self.default_score, 4)},
                "test": {"best": mean(self.best_test), "as_given": mean(self.default_test),
                         "best_per_task": self.best_test, "as_given_per_task": self.default_test},
                "candidates": self.history, "seconds": round(self.seconds, 1)}


def search_lora(experts: list, base_dir, *, method: str, params: dict | None = None, tune: list[str], tasks=None,
                cards: list[dict] | None = None, budget: int = 8, n: int = 30, n_test: int | None = None,
                optimizer: str = "NGOpt", seed: int = 0, space: str = "core", rank: int | None = None,
                progress: bool = False) -> LoraSearch:
    """Search the shared numbers ``tune`` (``alpha``, ``density``, ``lambda`` ...) of a LoRA-native merge
    for the best mean exact match on ``tasks`` (default: the experts' own, from ``cards``) within
    ``budget`` candidates; ``n`` validation rows per task score each."""
    from moerge.eval import evaluate, resolve_tasks
    from moerge.lm import base as base_model
    from moerge.search import check_search, make_optimizer

    check_search(budget, optimizer)
    m = lora_method(method)
    for name in tune:
        p = m.param(name)
        if p is None or p.type is not float or p.for_stats:
            numeric = [q.name for q in m.params if q.type is float and not q.for_stats]
            raise MoergeError(f"--search {name}: {method} has no such number to tune; it has "
                              f"{', '.join(numeric) or 'none'}")
    if not tune:
        raise MoergeError("name the parameters to search (e.g. alpha, density)")
    if budget > MAX_BUDGET:
        raise MoergeError(f"--budget {budget}: a LoRA merge's scale needs tens of candidates, not hundreds; give at most {MAX_BUDGET}")
    params = dict(params or {})
    for name in tune:  # a parameter to tune starts at its value as given, else at its default for LoRA experts
        p = m.param(name)
        if name not in params:
            params[name] = 1.0 if p.required else LORA_DEFAULTS.get(method, {}).get(name, p.default)
    start_at = {}
    for k in tune:
        if isinstance(params[k], (list, tuple)):
            raise MoergeError(f"--search {k}: the search tunes one {k} for every expert; start it from one number "
                              f"(e.g. --param {k}=1), not a list")
        try:  # a value given as text ("1.5") is a number to start from
            start_at[k] = m.param(k).check(params[k])
        except ValueError as e:
            raise MoergeError(f"{method}: {k} {e}") from None
    params |= start_at
    chosen = knobs({"parameters": start_at}, m, tune)
    names = resolve_tasks(tasks) if tasks else own_tasks(cards or [])
    start = time.perf_counter()

    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    from moerge.lm.device import resolve as device

    model, tok = base_model.load(base_dir, device=device())  # where evaluation runs (--device, else auto)
    patched = Patched(model)

    def score(values: list[float], split: str, rows: int) -> tuple[dict, dict]:
        trial = params | {k.name: v for k, v in zip(chosen, values)}
        patched.apply(merge_lora(experts, method, trial, space=space, rank=rank, seed=seed).updates)
        s = evaluate(model, tok, names, n=rows, split=split)
        return s, trial

    say(f"searching {', '.join(k.name for k in chosen)} of {method} with {optimizer}, {budget} candidates, "
        f"scored on {n} {SPLIT} prompts of {', '.join(names)}")
    # one number: after the value as given, four points spread over its range, so the optimiser starts from
    # a coarse picture of it rather than near the value as given
    spread = [[k.low + f * (k.high - k.low)] for k in chosen[:1] for f in (0.15, 0.35, 0.65, 0.85)] if len(chosen) == 1 else []
    opt = make_optimizer(chosen, budget=budget, optimizer=optimizer, seed=seed, first=spread[: max(0, budget - 1)])
    seen: dict[tuple, float] = {}
    history: list[dict] = []
    best = default = None
    import warnings

    # the values as candidates are scored: to a step of about a hundredth of each range, so points the
    # optimiser proposes again (or nearly again) are not merged twice; the budget counts distinct points
    steps = [10 ** math.floor(math.log10(max(k.high - k.low, 1e-12) / 100)) for k in chosen]
    asks = 0
    while len(seen) < budget and asks < 20 * budget:
        asks += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cand = opt.ask()
        except Exception as e:  # the optimiser's own model failing on flat scores: keep what was found
            say(f"the optimiser stopped after {len(seen)} candidates ({type(e).__name__}: {e}); keeping the best so far")
            break
        values = [round(min(k.high, max(k.low, round(float(v) / q) * q)), 6) for k, v, q in zip(chosen, cand.value, steps)]
        if not seen:  # the value as given, exactly (not on the grid)
            values = [k.value for k in chosen]
        key = tuple(values)
        fresh = key not in seen
        if fresh:
            scores, _ = score(values, SPLIT, n)
            seen[key] = sum(scores.values()) / len(scores)
            history.append({"values": dict(zip([k.name for k in chosen], values)), "score": round(seen[key], 4)})
            if default is None:
                default = (values, seen[key])
            better = best is None or seen[key] > best[1]
            if better:
                best = (values, seen[key])
            say(f"candidate {len(seen)}/{budget}: " + ", ".join(f"{k.name}={v:g}" for k, v in zip(chosen, values))
                + f" -> {seen[key]:.1%}" + (" (best so far)" if better else ""))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.tell(cand, -seen[key])
        except Exception as e:
            say(f"the optimiser stopped after {len(seen)} candidates ({type(e).__name__}: {e}); keeping the best so far")
            break
    if best is None:
        raise MoergeError(f"the optimiser {optimizer} proposed no candidate; try another --optimizer")
    say("scoring the best and the given value on the test split")
    best_test, _ = score(best[0], "test", n_test or n)
    default_test, _ = score(default[0], "test", n_test or n)
    return LoraSearch(chosen, names, n, dict(zip([k.name for k in chosen], best[0])),
                      dict(zip([k.name for k in chosen], default[0])), best[1], default[1], best_test, default_test,
                      history, time.perf_counter() - start)
