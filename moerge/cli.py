"""The ``moerge`` command: a thin typer layer over the Python API.

Every user-caused failure is a MoergeError: printed as one ``error:`` line, exit code 1, no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from moerge.errors import MoergeError

app = typer.Typer(
    name="moerge", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Merge, route and version specialist experts built from one base model.",
)
err = Console(stderr=True)
out = Console()


def _fail(e: MoergeError) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="A merge recipe (mergekit YAML is accepted unchanged)."),
    out_dir: Path = typer.Argument(..., help="Output folder; created atomically."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists (only once the new one is complete)."),
    out_shard_size: str = typer.Option("5B", "--out-shard-size", help="Max bytes per safetensors shard: 5B, 500M, 2G ..."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for random methods (DARE, DELLA); overrides the recipe's."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker threads (default: cores, at most 4)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge the models a recipe names into OUT_DIR."""
    import moerge

    try:
        plan = moerge.plan(recipe, seed=seed)
        if dry_run:
            out.print(plan.summary(), highlight=False)
            return
        from moerge.engine.executor import execute

        res = execute(plan, out_dir, overwrite=overwrite, workers=workers, shard_size=out_shard_size,
                      progress=not quiet and sys.stderr.isatty())
    except MoergeError as e:
        _fail(e)
    if not quiet:
        out.print(f"wrote {res.out_dir} ({res.tensors} tensors, {res.bytes_written / 1e6:.1f} MB) in {res.seconds:.2f} s", highlight=False)


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from moerge.methods import registry

    table = Table("method", "base", "inputs", "parameters (default)", title="merge methods")
    for name in registry.names():
        m = registry.get(name)
        params = ", ".join(
            f"{p.name}{'*' if p.per_input else ''}" + ("" if p.required else f" ({p.default})") for p in m.params
        )
        n = f"{m.min_inputs}" + ("+" if m.max_inputs is None else ("" if m.max_inputs == m.min_inputs else f"-{m.max_inputs}"))
        table.add_row(name, m.base, n, params or "-")
    out.print(table)
    out.print("* per model; inputs = models besides the base")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo-output"), "--out", help="Where the experts and merges are written."),
    quick: bool = typer.Option(False, "--quick", help="3 skills, fewer steps (about a minute; used by the tests)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the scoreboard as JSON."),
    report_dir: Path = typer.Option(Path("demo-report"), "--report", help="Where scoreboard.png is drawn."),
) -> None:
    """Train one expert per built-in skill, merge them, train a multitask baseline, score everything (offline)."""
    from moerge.demo import run_demo

    try:
        run_demo(out_dir, quick=quick, json_file=json_file, report_dir=report_dir, console=out, progress=sys.stderr.isatty())
    except MoergeError as e:
        _fail(e)


base_app = typer.Typer(no_args_is_help=True, help="The built-in tiny base model.")
expert_app = typer.Typer(no_args_is_help=True, help="Train and inspect specialist experts.")
tasks_app = typer.Typer(no_args_is_help=True, help="The built-in skill suite and its JSONL export.")
app.add_typer(base_app, name="base")
app.add_typer(expert_app, name="expert")
app.add_typer(tasks_app, name="tasks")


@base_app.command("build")
def base_build(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default: the user cache, $MOERGE_CACHE or ~/.cache/moerge)."),
    steps: int = typer.Option(600, "--steps", help="Pretraining steps (batch 64)."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing build."),
) -> None:
    """Pretrain the tiny base deterministically (about a minute on 2 cores)."""
    from moerge.base import build_base

    try:
        path = build_base(out_dir, seed=seed, steps=steps, overwrite=overwrite, progress=sys.stderr.isatty())
    except MoergeError as e:
        _fail(e)
    out.print(f"built {path}", highlight=False)


@base_app.command("path")
def base_path() -> None:
    """Print the folder of the base that commands use by default."""
    from moerge.base import default_base

    try:
        out.print(str(default_base()), highlight=False)
    except MoergeError as e:
        _fail(e)


@expert_app.command("train")
def expert_train(
    out_dir: Path = typer.Option(..., "--out", help="Expert folder to write (PEFT adapter + expert.json)."),
    task: Optional[str] = typer.Option(None, "--task", help="A built-in skill (see `moerge tasks list`)."),
    data: Optional[Path] = typer.Option(None, "--data", help='Your own JSONL: {"prompt": ..., "completion": ...} per line.'),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (default: the built-in base)."),
    adapter: str = typer.Option("lora", "--adapter", help="lora, dora, ia3, or none (full fine-tune)."),
    steps: int = typer.Option(200, "--steps"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default per adapter kind)."),
    rank: int = typer.Option(8, "--rank", help="LoRA/DoRA rank."),
    batch_size: int = typer.Option(64, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Train one expert from the base with PEFT (or fully) and write its card."""
    from moerge.train.expert import train_expert

    try:
        card = train_expert(out_dir, base=base, task=task, data=data, adapter=adapter, steps=steps, lr=lr, rank=rank,
                            batch_size=batch_size, seed=seed, overwrite=overwrite, progress=sys.stderr.isatty())
    except MoergeError as e:
        _fail(e)
    acc = "-" if card.validation_accuracy is None else f"{card.validation_accuracy:.1%}"
    out.print(f"wrote {out_dir}: {card.adapter} expert for {card.task}, {card.trainable_params:,} trainable parameters, "
              f"{card.seconds:.0f} s, validation exact match {acc}", highlight=False)


@expert_app.command("show")
def expert_show(expert_dir: Path = typer.Argument(..., help="An expert folder.")) -> None:
    """Print an expert's card."""
    import json
    from dataclasses import asdict

    from moerge.train.expert import ExpertCard

    try:
        out.print_json(json.dumps(asdict(ExpertCard.read(expert_dir))))
    except MoergeError as e:
        _fail(e)


@tasks_app.command("list")
def tasks_list() -> None:
    """The built-in skills, with an example of each."""
    from moerge.tasks import examples, skills

    table = Table("task", "kind", "instructions", "example prompt", "completion", title="built-in skills")
    for name, s in skills.SKILLS.items():
        e = examples(name, "train", 1)[0]
        kind = "held-out composite" if s.composite else "pretraining" if name in skills.PRETRAIN else "expert" if name in skills.EXPERTS else "skill"
        table.add_row(name, kind, " | ".join(s.instructions), e.prompt, e.completion)
    out.print(table)


@tasks_app.command("export")
def tasks_export(
    task: str = typer.Argument(..., help="A built-in skill."),
    out_file: Path = typer.Argument(..., help="JSONL file to write."),
    split: str = typer.Option("train", "--split", help="train, validation or test."),
    n: int = typer.Option(1000, "--n", help="Number of examples."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a split of a skill as JSONL, the format `expert train --data` reads."""
    from moerge.tasks import examples, write_jsonl

    try:
        write_jsonl(out_file, examples(task, split, n, seed))
    except MoergeError as e:
        _fail(e)
    out.print(f"wrote {n} examples to {out_file}", highlight=False)


@app.command("eval")
def eval_cmd(
    model_dir: Optional[Path] = typer.Argument(None, help="Model folder (default: the built-in base)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="An expert folder to apply to the model."),
    tasks: str = typer.Option("all", "--tasks", help="all, experts, heldout, or names separated by commas."),
    n: int = typer.Option(200, "--n", help="Test examples per task."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the scores as JSON."),
) -> None:
    """Exact-match accuracy of greedy completions on the test split of each task."""
    import json

    from moerge import base as base_model
    from moerge.eval import evaluate, resolve_tasks
    from moerge.train.expert import load_expert

    try:
        names = resolve_tasks(tasks)
        model, tok = load_expert(model_dir, adapter) if adapter else base_model.load(model_dir)
        scores = evaluate(model, tok, names, n=n)
    except MoergeError as e:
        _fail(e)
    table = Table("task", "exact match", title=f"{model_dir or 'built-in base'}" + (f" + {adapter}" if adapter else ""))
    for t, v in scores.items():
        table.add_row(t, f"{v:.1%}")
    table.add_row("[bold]mean", f"{sum(scores.values()) / len(scores):.1%}")
    out.print(table)
    if json_file:
        json_file.write_text(json.dumps({"model": str(model_dir or "base"), "adapter": str(adapter) if adapter else None, "scores": scores}, indent=2) + "\n")


def main() -> None:  # console_scripts entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
