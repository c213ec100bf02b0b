"""Evaluation on the built-in skills: exact match of greedy completions on a split.

``evaluate`` scores any model object with a transformers-style ``generate`` (a base, a PEFT model, a
merged checkpoint, a routed model), so every later feature reports in the same units.
"""

from __future__ import annotations

from typing import Iterable

from moerge.errors import MoergeError
from moerge.eval.harness import is_lm_eval, resolve, scores
from moerge.lm.generate import exact_match, greedy
from moerge.tasks import examples, skills
from moerge.tasks.data import is_user_task, user_rows

__all__ = ["evaluate", "exact_match", "greedy", "prompt_counts", "resolve_tasks"]


def resolve_tasks(spec: str | Iterable[str]) -> list[str]:
    """Comma-separated task names and groups: ``all`` (every skill of the tiny base's suite), ``experts``,
    ``heldout``; ``real`` (the real-model suite), ``real-experts``, ``real-heldout``; and users' tasks as
    JSONL files of ``{"prompt", "completion"}`` rows (scored on their test split); and ``lm-eval:TASK``,
    an lm-eval task by registry name or YAML path (scored by its first metric; ``eval.harness``)."""
    groups = {"all": list(skills.TINY), "experts": list(skills.EXPERTS), "heldout": list(skills.HELDOUT),
              "real": list(skills.REAL_EXPERTS + skills.REAL_HELDOUT), "real-experts": list(skills.REAL_EXPERTS),
              "real-heldout": list(skills.REAL_HELDOUT)}
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names: list[str] = []
    for item in spec:  # a group name expands in place, so "experts,heldout" works
        for n in groups.get(item, [item]):
            if n not in names:
                names.append(n)

    if any(is_lm_eval(n) for n in names):
        resolve([n for n in names if is_lm_eval(n)])  # a missing YAML or unknown lm-eval task fails here
    for n in names:
        if is_lm_eval(n):
            continue
        if is_user_task(n):
            user_rows(n)  # a missing or malformed file fails here, naming the line (read once, then cached)
        else:
            skills.get(n)  # unknown names fail with the list of known ones
    return names


def prompt_counts(names: list[str], n: int) -> dict[str, int]:
    """The test prompts each task gives when ``n`` are asked for: ``n``, or fewer for a JSONL file whose
    test split is smaller (one line, before any work, when it has none)."""
    return {t: n if is_lm_eval(t) else len(examples(t, "test", n)) for t in names}


def evaluate(model, tokenizer, tasks: str | Iterable[str] = "all", *, n: int = 200, split: str = "test", seed: int = 0) -> dict[str, float]:
    """Exact-match accuracy per task on ``n`` examples of ``split`` (an ``lm-eval:`` task: its first
    metric on at most ``n`` examples of the split its YAML names)."""
    names = resolve_tasks(tasks)
    lm = [t for t in names if is_lm_eval(t)]
    if lm and split != "test":
        raise MoergeError(f"{lm[0]}: lm-eval tasks are scored on the split their YAML names, not on a {split} split; "
                          "use moerge's own tasks or JSONL files here")
    lm_scores = scores(model, tokenizer, lm, n=n) if lm else {}
    return {t: lm_scores[t] if is_lm_eval(t) else exact_match(model, tokenizer, examples(t, split, n, seed)) for t in names}
