"""Small helpers shared by the commands that write folders and show progress."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from moerge.errors import MoergeError


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``out``; on success it replaces ``out`` in one rename
    (an existing ``out`` only with ``overwrite``), on failure it is removed. A reader never sees a
    half-written folder under the final name."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MoergeError(f"{out}: already exists; pass --overwrite or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def console(stderr: bool = False):
    """A rich console; when writing to a file or pipe (logs, CI) it is 200 columns wide rather than
    rich's 80, so wide tables (the demo's scoreboard) stay readable. $COLUMNS still wins."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=200 if wide else None)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` (same suffix, so writers that infer the format still do) to
    write to; renamed onto ``path`` when the block succeeds, removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def progress_bar(enabled: bool, label: str, total: int) -> Iterator[Callable[[float], None]]:
    """A rich bar over ``total`` steps; the callback advances it and shows the latest loss."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        tid = bar.add_task(label, total=total, loss="-")
        yield lambda loss: bar.update(tid, advance=1, loss=f"{loss:.3f}")


def quiet_transformers() -> None:
    """transformers' own progress bars and advisory warnings would drown ours."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
