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
    out_dir: Path = typer.Option(Path("demo-output"), "--out", help="Where the demo writes its models."),
    quick: bool = typer.Option(False, "--quick", help="Smaller models (used by the tests)."),
) -> None:
    """Merge tiny generated fine-tunes with every main method and compare the results (offline)."""
    from moerge.demo import run_demo

    try:
        run_demo(out_dir, quick=quick, console=out)
    except MoergeError as e:
        _fail(e)


def main() -> None:  # console_scripts entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
