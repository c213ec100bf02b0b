"""`moerge demo`: the whole loop on built-in data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moerge.cli.common import (
    DTYPE_OPT,
    THREADS_OPT,
    _user_errors,
    out,
)


def demo(
    out_dir: Path = typer.Option(Path("demo-output"), "--out", help="Where the experts and merges are written."),
    quick: bool = typer.Option(False, "--quick", help="3 skills, fewer steps (under 3 minutes on one thread; used by the tests)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the scoreboard as JSON."),
    report_dir: Path = typer.Option(Path("demo-report"), "--report", help="Where scoreboard.png is drawn."),
    skills: Optional[str] = typer.Option(None, "--skills", help="Built-in skills to train experts on, comma-separated "
                                         "(default: the six expert skills; see `moerge tasks list`)."),
    base: Optional[str] = typer.Option(None, "--base", help="The base: the built-in tiny one (default), a real base by "
                                       "name (smollm2-135m-instruct, after `moerge base get`) or a model folder."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Train one expert per built-in skill, merge them, route, train a multitask baseline, score everything (offline)."""
    from moerge.demo import run_demo

    with _user_errors():
        run_demo(out_dir, quick=quick, json_file=json_file, report_dir=report_dir, console=out, progress=True,
                 skills=[t.strip() for t in skills.split(",") if t.strip()] if skills else None, base=base)
