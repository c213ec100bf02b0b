"""`moerge eval`: exact match on built-in skills or JSONL tasks, or the lm-evaluation-harness."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moerge.cli.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    LIBRARY,
    THREADS_OPT,
    _user_errors,
    out,
)

LM_EVAL_OPT = typer.Option(None, "--lm-eval", metavar="TASKS", help="Score with the lm-evaluation-harness instead: "
                           "its task names (data from the hub) or your own task YAML files or folders, comma-separated "
                           "(needs `pip install 'moerge[lm-eval]'`).")
LIMIT_OPT = typer.Option(None, "--limit", min=1, help="--lm-eval: at most this many examples per task (default: all).")
FEWSHOT_OPT = typer.Option(None, "--num-fewshot", min=0, help="--lm-eval: few-shot examples (default: each task's own).")


def eval_cmd(
    model_dir: Optional[Path] = typer.Argument(None, help="Model folder (default: with --adapter, the base its "
                                               "expert.json names; else the built-in base)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="An expert to apply to the model: a folder, or "
                                          "library://NAME[@V] (on the library's base it was made on)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="all (default), experts, heldout, task names, JSONL files "
                                        "of your own, or lm-eval:TASK (an lm-eval task by name or YAML path, scored by "
                                        "its first metric), separated by commas."),
    n: Optional[int] = typer.Option(None, "--n", help="Test examples per task (default 200)."),
    lm_eval_tasks: Optional[str] = LM_EVAL_OPT,
    limit: Optional[int] = LIMIT_OPT,
    num_fewshot: Optional[int] = FEWSHOT_OPT,
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the scores as JSON."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
    library: Optional[Path] = LIBRARY,
) -> None:
    """Exact-match accuracy of greedy completions on the test split of each task; or, with --lm-eval,
    every metric of lm-eval's tasks."""
    from moerge.api import evaluate
    from moerge.util.files import output_file

    with _user_errors():
        if json_file:
            output_file(json_file, "scores (--json)", inputs=(model_dir, adapter, tasks, lm_eval_tasks))
        res = evaluate(model_dir, adapter=adapter, tasks=tasks, n=n, lm_eval=lm_eval_tasks, limit=limit,
                       num_fewshot=num_fewshot, progress=True, library=library)
    show_scores(res, json_file)


def show_scores(res, json_file: Optional[Path], extra_columns: bool = False) -> None:
    """An evaluation's table (exact match per task, and for a router the weight each expert got) and,
    with --json, the same as JSON; lm-eval's results as lm-eval reports them."""
    from moerge.util.files import write_json

    if res.lm_eval is not None:
        _lm_eval_done(res.lm_eval, res.title, json_file, res.meta)
        return
    if extra_columns:
        table = Table("task", "exact match", *res.experts, title=f"router {res.meta['router']}: accuracy and mean "
                      "expert weight")
        for t, v in res.scores.items():
            table.add_row(t, f"{v:.1%}", *[f"{w:.2f}" for w in res.usage[t]])
    else:
        table = Table("task", "score", title=res.title)
        for t, v in res.scores.items():
            table.add_row(t, f"{v:.1%}")
        table.add_row("[bold]mean", f"{res.mean:.1%}")
    out.print(table)
    if json_file:
        with _user_errors():
            write_json(json_file, res.meta | ({"scores": res.scores, "usage": res.usage} if extra_columns
                                              else {"scores": res.scores}))


def _lm_eval_done(res, title: str, json_file: Optional[Path], meta: dict) -> None:
    """lm-eval's results as a table (task, metric, value, stderr) and, with --json, as JSON."""
    from moerge.util.files import write_json

    table = Table("task", "metric", "value", "stderr", "n", title=f"{title} (lm-eval)")
    for task, r in res.results.items():
        for key, value in r.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            stderr = r.get(f"{name}_stderr,{filt}")
            table.add_row(task, name + ("" if filt == "none" else f" ({filt})"), f"{value:.4f}",
                          f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-", str(res.n.get(task, "")))
    out.print(table)
    if json_file:
        with _user_errors():
            write_json(json_file, meta | {"lm_eval": res.to_dict()})
