"""`moerge route` and `moerge generate`: routing each input among experts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moerge.api import LORAHUB_BUDGET, LORAHUB_SHOTS
from moerge.cli.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    EMBEDDER_OPT,
    THREADS_OPT,
    _user_errors,
    err,
    out,
)
from moerge.cli.eval import FEWSHOT_OPT, LIMIT_OPT, LM_EVAL_OPT, show_scores
from moerge.errors import MoergeError

route_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                        help="Route each input among experts (one batched forward pass).")
EXPERTS_OPT = typer.Option(None, "--experts", help="Expert folders (comma-separated) instead of a library; or NAME@V refs with --library.")


def _refs(experts: Optional[str]) -> list[str]:
    return [e for e in (experts or "").split(",") if e]


def _routed(router: str, library: Optional[Path], experts: Optional[str], base: Optional[Path], top_k: Optional[int],
            temperature: Optional[float], embedder: Optional[str] = None):
    from moerge.routing import load_routed

    return load_routed(router, experts=_refs(experts) or None, library=library, base=base, top_k=top_k,
                       temperature=temperature, embedder=embedder)


@route_app.command("list")
def route_list() -> None:
    """The routers."""
    from moerge.routing.registry import get, names

    table = Table("router", "level", "what it does", title="routers")
    for n in names():
        cls = get(n)
        table.add_row(n, cls.level, cls.help)
    out.print(table)


@route_app.command("eval")
def route_eval(
    router: str = typer.Option(..., "--router", help="See `moerge route list`."),
    library: Optional[Path] = typer.Option(None, "--library", help="Route among the library's latest experts (default: "
                                           "$MOERGE_LIBRARY's, when no --experts are given)."),
    experts: Optional[str] = EXPERTS_OPT,
    base: Optional[Path] = typer.Option(None, "--base", help="Base for expert folders (default: the one their cards "
                                        "name, else the built-in base)."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    embedder: Optional[str] = EMBEDDER_OPT,
    tasks: Optional[str] = typer.Option(None, "--tasks", help="experts (default), all, heldout, task names or JSONL "
                                        "files of your own, separated by commas."),
    n: Optional[int] = typer.Option(None, "--n", help="Test examples per task (default 200)."),
    json_file: Optional[Path] = typer.Option(None, "--json"),
    shots: int = typer.Option(LORAHUB_SHOTS, "--shots", help="lorahub: training examples of each task its weights are "
                              "searched on."),
    budget: int = typer.Option(LORAHUB_BUDGET, "--budget", help="lorahub: loss evaluations of the gradient-free search."),
    lm_eval_tasks: Optional[str] = LM_EVAL_OPT,
    limit: Optional[int] = LIMIT_OPT,
    num_fewshot: Optional[int] = FEWSHOT_OPT,
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Exact match of the routed model on the test split of each task, and where the router sent each task;
    or, with --lm-eval, every metric of lm-eval's tasks (the router picks the experts for each input)."""
    from moerge.api import evaluate_router
    from moerge.util.files import output_file

    with _user_errors():
        if json_file:
            output_file(json_file, "scores (--json)", inputs=(library, experts, base, tasks, lm_eval_tasks))
        res = evaluate_router(router, library=library, experts=_refs(experts), base=base, top_k=top_k,
                              temperature=temperature, embedder=embedder, tasks=tasks, n=n, shots=shots, budget=budget,
                              lm_eval=lm_eval_tasks, limit=limit, num_fewshot=num_fewshot, progress=True)
    show_scores(res, json_file, extra_columns=True)


def generate_cmd(
    prompt: str = typer.Argument(..., help='A prompt, e.g. "reverse: abc="'),
    router: str = typer.Option("centroid", "--router"),
    library: Optional[Path] = typer.Option(None, "--library"),
    experts: Optional[str] = EXPERTS_OPT,
    base: Optional[Path] = typer.Option(None, "--base", help="Base for expert folders (default: the one their cards "
                                        "name, else the built-in base)."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    embedder: Optional[str] = EMBEDDER_OPT,
    examples_file: Optional[Path] = typer.Option(None, "--examples", help="lorahub: a few examples of the prompt's task "
                                                 "(JSONL of {\"prompt\", \"completion\"}) its composition is searched on."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Answer one prompt with the routed model; print the answer and the experts it used."""
    from moerge.eval import greedy
    from moerge.tasks import read_jsonl

    with _user_errors():
        model = _routed(router, library, experts, base, top_k, None, embedder)
        if model.router.few_shot:
            if examples_file is None:
                raise MoergeError(f"router {router!r} needs a few examples of the task: --examples FILE (JSONL of prompt/completion)")
            model.router.adapt(model, read_jsonl(examples_file))
        elif examples_file is not None:
            raise MoergeError(f"router {router!r} takes no examples; --examples is for few-shot routers (lorahub)")
        answer = greedy(model, model.tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
        weights = model.usage([prompt]).tolist()
    out.print(answer, highlight=False, markup=False)
    used = ", ".join(f"{n} {w:.2f}" for n, w in sorted(zip(model.names, weights), key=lambda x: -abs(x[1])) if abs(w) >= 0.01)
    err.print(f"experts: {used}", highlight=False, markup=False)
