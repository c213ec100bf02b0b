"""The merge report: a merge scored against its own inputs (``moerge merge ... --eval TASKS``).

Merging is cheap and evaluation is what tells whether a merge is any good, so the report scores the
output and every input model (the base too) on the same tasks and prompts, writes the table into the
output's model card (``README.md``) and as ``merge_report.json`` beside it, and warns when the merge
falls below an input on that input's own tasks: the skill named by its expert card (or the ``data``
the recipe gave it), else the tasks where it is the best input. A multi-document recipe is scored
against the models it starts from (its stages' intermediate outputs are gone by then).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from moerge.engine.dense import load_dense, load_tokenizer
from moerge.engine.multi import MultiPlan, MultiRecipe
from moerge.engine.plan import Plan
from moerge.engine.run import load_recipe, plan
from moerge.errors import MoergeError
from moerge.eval import evaluate, prompt_counts, resolve_tasks
from moerge.lm import base as base_model
from moerge.lm.precision import compute_dtype, folder_dtype, model_kwargs
from moerge.util.files import atomic_file

REPORT = "merge_report.json"
SECTION = "## Evaluation (moerge merge --eval)"


@dataclass
class MergeReport:
    tasks: list[str]
    n: int
    merged: dict[str, float]
    inputs: list[dict]  # {"model", "role": "base" | "input", "scores", "own": [tasks]}
    warnings: list[str] = field(default_factory=list)
    prompts: dict[str, int] = field(default_factory=dict)  # task -> test prompts scored (a JSONL file may hold fewer than n)
    dtype: str = "float32"  # what every model computed in (as `moerge eval` would load it)

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "n": self.n, "prompts": self.prompts, "dtype": self.dtype, "merged": self.merged,
                "inputs": self.inputs, "warnings": self.warnings}

    def prompts_line(self) -> str:
        return prompts_line(self.tasks, self.prompts, self.n)

    def markdown(self) -> str:
        head = "| model | " + " | ".join(self.tasks) + " | mean |\n|---|" + "---|" * (len(self.tasks) + 1) + "\n"

        def row(name: str, scores: dict, own: Iterable[str] = ()) -> str:
            cells = [f"**{scores[t]:.1%}**" if t in own else f"{scores[t]:.1%}" for t in self.tasks]
            return f"| {name} | " + " | ".join(cells) + f" | {_mean(scores):.1%} |\n"

        body = row("**merge**", self.merged)
        for m in self.inputs:
            body += row(f"`{m['model']}`" + (" (base)" if m["role"] == "base" else ""), m["scores"], m["own"])
        lm = [t for t in self.tasks if t.startswith("lm-eval:")]
        note = (f"\nExact match of greedy completions ({self.prompts_line()}, computed in {self.dtype})"
                + (f" ({', '.join(lm)}: lm-eval's first metric of the task, on at most {self.n} examples)" if lm else "")
                + "; an input's own tasks in bold.\n")
        warn = "".join(f"\n> warning: {w}\n" for w in self.warnings)
        return f"{SECTION}\n\n" + head + body + note + warn


def prompts_line(tasks: list[str], prompts: dict[str, int], n: int) -> str:
    """How many test prompts each task had: "100 test prompts per task", or the counts where they differ
    (a JSONL task's test split may hold fewer than asked for)."""
    counts = {t: prompts.get(t, n) for t in tasks}
    if len(set(counts.values())) <= 1:
        k = next(iter(counts.values()), n)
        return f"{k} test prompt{'s' if k != 1 else ''} per task"
    return "test prompts per task: " + ", ".join(f"{t} {k}" for t, k in counts.items())


def _mean(scores: dict) -> float:
    return sum(scores.values()) / max(1, len(scores))


def _inputs(recipe, library) -> list[tuple[object, str]]:
    """(opened model, "base" | "input") for every model the recipe merges, headers only."""
    p = plan(recipe, library=library)
    if isinstance(p, MultiPlan):
        models = list(p.opened.values())
        base_refs = {s.stage.recipe.base_model for s in p.stages if s.stage.recipe.base_model}
        return [(m, "base" if m.ref in base_refs else "input") for m in models]
    if not isinstance(p, Plan):
        raise MoergeError("--eval: an MoE config is not scored against its inputs yet; evaluate the output with `moerge eval`")
    bases = {t.base[0] for t in p.tasks if t.base}
    return [(m, "base" if i in bases else "input") for i, m in enumerate(p.models)]


def _own(model, data: str | None, names: list[str]) -> list[str]:
    """The tasks of ``names`` a model was tuned for: its expert card's task (or data file), or the data
    the recipe gave it."""
    card = model.expert_card()
    claimed = set((card.get("task") or "").split(",")) | {card.get("data") or ""} | set((data or "").split(","))
    claimed |= {str(Path(c).resolve()) for c in claimed if c.endswith(".jsonl")}
    return [t for t in names if t in claimed or (t.endswith(".jsonl") and str(Path(t).resolve()) in claimed)]


def merge_report(recipe, out_dir: str | os.PathLike, tasks, *, n: int = 100, library=None, progress: bool = False,
                 write: bool = True) -> MergeReport:
    """Score the merged model in ``out_dir`` and every input of ``recipe`` on ``tasks``; with ``write``,
    add the table to the output's README.md and write ``merge_report.json`` (both atomically)."""
    import sys

    names = resolve_tasks(tasks)
    out_dir = Path(out_dir)

    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    prompts = prompt_counts(names, n)
    model, tok = base_model.load(out_dir)
    dtype = next(model.parameters()).dtype
    say(f"evaluating the merge on {len(names)} task(s) ({prompts_line(names, prompts, n)}), in "
        f"{str(dtype).removeprefix('torch.')}")
    merged = evaluate(model, tok, names, n=n)
    del model
    inputs = []
    data = _data_params(recipe)
    for m, role in _inputs(recipe, library):
        say(f"evaluating {m.ref}")
        # each input computes in the dtype `moerge eval` would give it (a bf16 checkpoint: bf16 where this CPU
        # is faster in it), so its row here is the score `moerge eval` prints for it
        own = compute_dtype(folder_dtype(m.folder))
        dense, itok = load_dense(m, own, **model_kwargs(own)), load_tokenizer(m, "--eval")
        scores = evaluate(dense, itok, names, n=n)
        inputs.append({"model": m.pinned, "role": role, "scores": scores, "own": []})
        inputs[-1]["own"] = _own(m, data.get(m.ref), names) if role == "input" else []
    _claim_best(inputs, names)
    warnings = [f"the merge scores {merged[t]:.1%} on {t}, below {m['model']} ({m['scores'][t]:.1%}), one of whose own "
                f"tasks it is" for m in inputs if m["role"] == "input" for t in m["own"] if merged[t] < m["scores"][t]]
    report = MergeReport(names, n, merged, inputs, warnings, prompts, str(dtype).removeprefix("torch."))
    if write:

        with atomic_file(out_dir / REPORT) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        card = out_dir / "README.md"
        text = card.read_text() if card.is_file() else ""
        text = text.split(f"\n{SECTION}")[0].rstrip("\n") + "\n\n" + report.markdown()  # a re-run replaces its section
        with atomic_file(card) as tmp:
            tmp.write_text(text)
    return report


def _claim_best(inputs: list[dict], names: list[str]) -> None:
    """An input with no known task of its own owns the tasks where it is the best input."""
    merged_inputs = [m for m in inputs if m["role"] == "input"]
    for m in merged_inputs:
        if not m["own"]:
            m["own"] = [t for t in names if m["scores"][t] > 0 and m["scores"][t] == max(x["scores"][t] for x in merged_inputs)]


def _data_params(recipe) -> dict[str, str]:
    """model reference -> the ``data`` a recipe gives it (a data-aware merge's), for every stage."""
    r = load_recipe(recipe)
    out: dict[str, str] = {}
    for rr in (r.stages if isinstance(r, MultiRecipe) else [r]):
        for m in getattr(getattr(rr, "recipe", rr), "models", None) or []:
            d = (m.parameters or {}).get("data")
            if isinstance(d, str):
                out.setdefault(m.model, d)
    return out
