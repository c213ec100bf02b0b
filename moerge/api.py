"""The Python API: what the CLI wraps, one function per job, with the defaults.

    import moerge
    moerge.merge("recipe.yaml", "out/")             # a mergekit-style recipe, path or text or Recipe
    plan = moerge.plan("recipe.yaml"); print(plan.summary())

A file of several YAML documents (mergekit-multi's form) is a MultiRecipe: ``merge`` runs its stages
in dependency order and ``plan`` returns a MultiPlan (every stage, in run order).

The defaults live here (the CLI passes None for what the user did not say). Each function imports
the parts it runs when called (start-up time: ``import moerge`` and ``moerge --help`` load no torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moerge.engine.run import load_recipe, plan, run
from moerge.errors import MoergeError

if TYPE_CHECKING:
    from moerge.engine.executor import MergeResult
    from moerge.experts.card import ExpertCard


def merge(recipe, out_dir: "str | os.PathLike", *, overwrite: bool = False, seed: int | None = None,
          workers: int | None = None, shard_size: "str | int" = "5B", progress: bool = False,
          library: "str | os.PathLike | None" = None,
          keep_intermediates: "str | os.PathLike | None" = None, allow_same_experts: bool = False,
          lazy: bool = False, eval_tasks=None, eval_n: int = 100, device: "str | None" = None) -> "MergeResult":
    """Merge the models a recipe names into ``out_dir`` (created atomically). A multi-document recipe
    runs its stages in dependency order; their outputs go to a temporary folder, removed afterwards,
    or to ``keep_intermediates/NAME`` (``lazy``: reuse those an earlier run kept, when their saved recipe
    is the stage's); only the final stage writes ``out_dir``. ``eval_tasks`` (task names, groups or
    JSONL files, as ``moerge eval --tasks``) scores the output against every input afterwards
    (``eval.report``): the table goes into the output's card and ``merge_report.json``, and is the
    result's ``report``. ``device``: where each tensor is computed, streamed one at a time (None: the
    ``--device`` the user named, else the CPU; mergekit's ``--cuda``)."""
    from moerge.util.files import check_output_dir

    check_output_dir(out_dir, overwrite)  # an existing output is refused before any planning, not after
    if eval_tasks is not None:
        from moerge.eval import prompt_counts, resolve_tasks

        # an unknown task, or a JSONL file with no test rows, is refused before any merging
        prompt_counts(resolve_tasks(eval_tasks), eval_n)
    res = run(recipe, out_dir, overwrite=overwrite, seed=seed, workers=workers, shard_size=shard_size,
              progress=progress, library=library, keep_intermediates=keep_intermediates,
              allow_same_experts=allow_same_experts, lazy=lazy, device=device)
    if eval_tasks is not None:
        from moerge.eval.report import merge_report

        res.report = merge_report(recipe, res.out_dir, eval_tasks, n=eval_n, library=library, progress=progress)
    return res


def merge_lora(experts: list, out_dir: "str | os.PathLike", *, method: str | None = None, params: dict | None = None,
               space: str | None = None, rank: int | None = None, seed: int = 0, base: "str | os.PathLike | None" = None,
               task: str | None = None, library: "str | os.PathLike | None" = None, add: str | None = None,
               overwrite: bool = False, search: "list[str] | None" = None, tasks=None, budget: int = 8, n: int = 30,
               progress: bool = False):
    """Merge LoRA experts (folders, or ``library://NAME[@V]``) into one LoRA expert at ``out_dir`` (a PEFT
    folder with its card and lineage), not into a model: ``method`` (default ``iso_cts``) runs in the
    experts' shared ``space`` (default ``core``, where Iso-C/Iso-CTS/TSV/linear equal their dense merge);
    ``rank`` cuts every layer to that rank (default: its exact rank). ``add``: also add it to the library
    (``library``, default $MOERGE_LIBRARY, else ".") under that name. ``search``: parameters to choose
    first (``["alpha"]``, ``["density"]`` ...) by the best exact match on ``n`` validation rows of
    ``tasks`` (default: the experts' own data, from their cards) within ``budget`` candidates
    (``search.lora``); what was tried and found goes into the card. Returns the
    :class:`~moerge.engine.lora_merge.LoraMerge` (ranks, energy kept, resolved parameters, ``report``)."""
    from moerge.engine.lora_merge import DEFAULT_METHOD, merge_lora_folders, open_inputs, refs_of
    from moerge.util.files import check_output_dir

    refs = refs_of(experts)
    search = [search] if isinstance(search, str) else list(search or [])
    method, space, record, lib = method or DEFAULT_METHOD, space or "core", None, None
    if add:  # a name or library that cannot take the result is refused before the merge, not after
        from moerge.library.store import Library, check_name

        check_name(add)
        lib = Library.open(library)
        lib.base()  # not a library: one line, now
    if search or lib is not None:
        check_output_dir(out_dir, overwrite, inputs=[r for r in refs if not r.startswith("library://")])
        loaded, cards, base_dir, _ = open_inputs(refs, base, library)
        if lib is not None:
            from moerge.io.fingerprint import folder_fingerprint

            if folder_fingerprint(base_dir) != lib.base().fingerprint:
                raise MoergeError(f"--add {add}: the experts were made on {base_dir}, and the library {lib.root} holds experts "
                                  f"of {lib.base().path}; add it to a library of their base")
    if search:
        from moerge.search.lora import search_lora

        found = search_lora(loaded, base_dir, method=method, params=params, tune=search, tasks=tasks, cards=cards,
                            budget=budget, n=n, seed=seed, space=space, rank=rank, progress=progress)
        params, record = dict(params or {}) | found.best, found.record()
    res = merge_lora_folders(refs, out_dir, method=method, params=params, space=space, rank=rank, seed=seed,
                             base=base, library=library, task=task, overwrite=overwrite, search=record)
    if lib is not None:
        res.report["library_ref"] = lib.add(out_dir, add).ref
    return res


def train_expert(out_dir: "str | os.PathLike", *, gate_steps: int = 0, **kwargs) -> "ExpertCard":
    """Train one expert (``moerge.train.expert.train_expert``: task or data, base, adapter, steps, ...)
    and, with ``gate_steps``, its PHATGOOSE gates afterwards (the expert frozen), so the routers find
    them beside it. Refused before any training when the expert could not take gates."""
    from moerge.experts.card import ALIASES
    from moerge.train.expert import train_expert as train  # start-up time: torch

    if gate_steps and ALIASES.get(kwargs.get("adapter", "lora"), kwargs.get("adapter")) == "full":
        raise MoergeError("--gate-steps: PHATGOOSE gates route adapters; a full fine-tune (--adapter full) is merged, not routed")
    card = train(out_dir, **kwargs)
    if gate_steps:
        from moerge.routing.routers.phatgoose import train_gates

        train_gates(out_dir, base=card.base, steps=gate_steps, seed=kwargs.get("seed", 0),
                    progress=kwargs.get("progress", True))
    return card


# -------------------------------------------------------------------------------- evaluation

EVAL_N = 200  # test prompts per task: enough to tell 5 points apart on the built-in skills
ROUTE_TASKS = "experts"  # a router is scored where its experts are meant to help
LORAHUB_SHOTS, LORAHUB_BUDGET = 5, 40  # LoraHub's few-shot search: examples per task, loss evaluations


@dataclass
class Scores:
    """What an evaluation measured: exact match per task (``scores``), or lm-eval's full results
    (``lm_eval``, with ``lm_eval=...``); for a router also the mean weight each expert got per task."""

    title: str
    meta: dict
    scores: dict[str, float] = field(default_factory=dict)
    prompts: dict[str, int] = field(default_factory=dict)  # test prompts scored per task
    lm_eval: Any = None  # eval.harness.HarnessResult
    usage: dict[str, list[float]] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / max(1, len(self.scores))


def _eval_plan(tasks, n, lm_eval, limit, num_fewshot, default_tasks: str):
    """(task names or None, n, lm-eval tasks or None): refuses options that would be silently ignored
    (--tasks/--n beside --lm-eval, which scores lm-eval's tasks only; --limit/--num-fewshot without it)."""
    from moerge.eval import (  # start-up time: the evaluators load torch
        harness,
        resolve_tasks,
    )

    if lm_eval is not None:
        if tasks is not None:
            raise MoergeError("--tasks and --lm-eval: give one (lm-eval tasks sit among --tasks as lm-eval:TASK, "
                              "scored by their first metric)")
        if n is not None:
            raise MoergeError("--n applies to --tasks; with --lm-eval, --limit caps the examples per task")
        return None, None, harness.resolve(lm_eval)
    for flag, v in (("--limit", limit), ("--num-fewshot", num_fewshot)):
        if v is not None:
            raise MoergeError(f"{flag} applies to --lm-eval tasks; for --tasks use --n")
    n = EVAL_N if n is None else n
    if n < 1:
        raise MoergeError(f"--n must be at least 1 (test examples per task), got {n}")
    return resolve_tasks(default_tasks if tasks is None else tasks), n, None


def evaluate(model: "str | os.PathLike | None" = None, *, adapter: "str | os.PathLike | None" = None, tasks=None,
             n: int | None = None, lm_eval=None, limit: int | None = None, num_fewshot: int | None = None,
             device: str | None = None, progress: bool = False, library: "str | os.PathLike | None" = None) -> Scores:
    """Score a model folder (None: with ``adapter``, the base its card names; else the built-in base),
    with an expert applied (a folder, or ``library://NAME[@V]`` of ``library``, on the library's base it
    was made on), on ``tasks`` (default ``all``: exact match of greedy completions on
    ``n`` test prompts each, default 200) or on lm-eval's tasks (``lm_eval``: every metric), on
    ``device`` (None: the ``--device`` setting; ``auto``: CUDA when there is one)."""
    import tempfile
    from pathlib import Path

    from moerge.eval import evaluate as exact_match_scores
    from moerge.eval import harness, prompt_counts
    from moerge.experts.card import recorded_base
    from moerge.lm import base as base_model
    from moerge.lm.device import resolve as resolve_device
    from moerge.train.expert import load_expert

    names, n, lm_tasks = _eval_plan(tasks, n, lm_eval, limit, num_fewshot, "all")
    where = resolve_device(device)
    if adapter is not None and str(adapter).startswith("library://"):
        from moerge.library import Library

        lib = Library.open(library)
        entry = lib.get(str(adapter).removeprefix("library://"))
        model = model if model is not None else lib.base(entry.base_version).path
        with tempfile.TemporaryDirectory(prefix="moerge-eval-") as d:  # PEFT reads the folder while loading only
            loaded, tok = load_expert(model, lib.export(entry.ref, Path(d) / entry.name), where)
        adapter = f"library://{entry.ref}"
    else:
        if adapter is not None and model is None:
            # the base the expert was made on (None: nothing says; the built-in one)
            model = recorded_base(adapter, "give that base as the MODEL argument")
        loaded, tok = load_expert(model, adapter, where) if adapter else base_model.load(model, device=where)
    title = f"{model or 'built-in base'}" + (f" + {adapter}" if adapter else "") + ("" if where.type == "cpu" else f" ({where})")
    meta = {"model": str(model or "base"), "adapter": str(adapter) if adapter else None, "device": str(where)}
    if lm_tasks is not None:
        return Scores(title, meta, lm_eval=harness.run(loaded, tok, lm_tasks, limit=limit, num_fewshot=num_fewshot,
                                                       progress=progress))
    return Scores(title, meta, scores=exact_match_scores(loaded, tok, names, n=n), prompts=prompt_counts(names, n))


def evaluate_router(router: str, *, library: "str | os.PathLike | None" = None, experts: list | None = None,
                    base: "str | os.PathLike | None" = None, top_k: int | None = None, temperature: float | None = None,
                    embedder: str | None = None, tasks=None, n: int | None = None, shots: int = LORAHUB_SHOTS,
                    budget: int = LORAHUB_BUDGET, lm_eval=None, limit: int | None = None,
                    num_fewshot: int | None = None, device: str | None = None, progress: bool = False) -> Scores:
    """Score a routed model (``router`` over a library's latest adapters — ``$MOERGE_LIBRARY``'s when
    neither a library nor expert folders are given — or over ``experts``) on ``tasks`` (default: the
    experts' skills), with where it sent each task; or on lm-eval's tasks. ``shots`` and ``budget``:
    LoraHub's few-shot search (examples per task, loss evaluations). ``device``: where the base and
    the experts compute (None: the ``--device`` setting)."""
    from moerge.eval import harness, prompt_counts
    from moerge.routing import load_routed
    from moerge.routing.evaluate import evaluate_routed

    names, n, lm_tasks = _eval_plan(tasks, n, lm_eval, limit, num_fewshot, ROUTE_TASKS)
    routed = load_routed(router, experts=experts or None, library=library, base=base, top_k=top_k,
                         temperature=temperature, embedder=embedder, device=device)
    if router == "lorahub":
        routed.router.budget = budget
    title = f"router {router} over {', '.join(routed.names)}"
    meta = {"router": router, "experts": routed.names}
    if lm_tasks is not None:
        if routed.router.few_shot:
            raise MoergeError(f"router {router!r} adapts to each task from its examples; lm-eval tasks give it none. "
                              "Use another router with --lm-eval")
        res = harness.run(routed, routed.tokenizer, lm_tasks, limit=limit, num_fewshot=num_fewshot, progress=progress)
        return Scores(title, meta, lm_eval=res, experts=routed.names)
    scores, usage = evaluate_routed(routed, names, n=n, shots=shots)
    return Scores(title, meta, scores=scores, prompts=prompt_counts(names, n), usage=usage, experts=routed.names)


__all__ = ["Scores", "evaluate", "evaluate_router", "load_recipe", "merge", "merge_lora", "plan", "train_expert"]
