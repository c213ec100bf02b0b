"""Small helpers shared by the commands that write folders and show progress."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from moerge.errors import MoergeError


def cache_dir() -> Path:
    """``$MOERGE_CACHE`` or ``~/.cache/moerge``: the built-in base once built, real bases, statistics."""
    return Path(os.environ.get("MOERGE_CACHE") or Path.home() / ".cache" / "moerge")


def _input_paths(inputs) -> list[Path]:
    """Paths among ``inputs``: paths, or strings listing them (comma-separated task lists with
    ``lm-eval:`` items, ``base+adapter``); what does not exist (a task name) is left out."""
    paths: list[Path] = []
    for item in inputs or ():
        if item is None:
            continue
        if not isinstance(item, str):
            item = os.fspath(item)
        for part in item.split(","):
            part = part.strip().removeprefix("lm-eval:")
            for cand in {part, *part.split("+")}:
                if cand and Path(cand).exists():
                    paths.append(Path(cand).resolve())
    return paths


def not_an_input(out: str | os.PathLike, inputs, what: str, folder: bool = False) -> None:
    """Refuse an output that would overwrite what the command reads: the same path, an existing file
    inside an input folder, or (for an output folder, which replaces what is there) a folder holding
    an input or lying inside one. ``inputs``: paths or comma-separated lists of them; those that do
    not exist (task names) are ignored."""
    o = Path(out).resolve()
    for p in _input_paths(inputs):
        inside = p in o.parents
        if o == p or (folder and (inside or o in p.parents)) or (inside and o.exists()):
            raise MoergeError(f"{out}: would overwrite the input {p}; choose another path for the {what}")


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs=()) -> Path:
    """Refuse an output folder that exists (without ``overwrite``), cannot be made, or would replace
    one of the command's ``inputs``, before the work starts rather than after it."""
    out = Path(out)
    not_an_input(out, inputs, "output folder", folder=True)
    if out.exists() and not overwrite:
        raise MoergeError(f"{out}: already exists; pass --overwrite or choose another folder")
    if out.exists() and not out.is_dir():
        raise MoergeError(f"{out}: is a file; choose a folder name for the output")
    _make_parent(out, "output folder")
    return out


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``out``; on success it replaces ``out`` in one rename
    (an existing ``out`` only with ``overwrite``), on failure it is removed. A reader never sees a
    half-written folder under the final name."""
    out = check_output_dir(out, overwrite)
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


def output_file(path: str | os.PathLike, what: str = "output file", inputs=()) -> Path:
    """Check a file the command will write, before any work starts: its folder is created if missing,
    and a path that is a folder, lies under a file, cannot be written, or would overwrite one of the
    command's ``inputs`` is refused in one line."""
    path = Path(path)
    not_an_input(path, inputs, what)
    if path.is_dir():
        raise MoergeError(f"{path}: is a folder; give a file name for the {what}")
    return _make_parent(path, what)


def _make_parent(path: Path, what: str) -> Path:
    """Create ``path``'s folder if missing, or refuse in one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MoergeError(f"{path}: a part of its folder is a file; choose another path for the {what}") from None
    except OSError as e:
        raise MoergeError(f"{path}: cannot create its folder ({e.strerror}); choose another path for the {what}") from None
    if not os.access(path.parent, os.W_OK):
        raise MoergeError(f"{path}: its folder is not writable; choose another path for the {what}")
    return path


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` (same suffix, so writers that infer the format still do) to
    write to; renamed onto ``path`` when the block succeeds, removed when it fails. The folder is
    checked (and created) first, as ``output_file`` does."""
    path = output_file(path)
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data) -> Path:
    """``data`` as indented JSON, written atomically."""
    import json

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


LOG_EVERY = 5.0  # seconds between plain progress lines when stderr is not a terminal


@contextmanager
def progress_bar(enabled: bool, label: str, total: int) -> Iterator[Callable[[float], None]]:
    """Progress over ``total`` steps; the callback advances it and records the latest loss.

    On a terminal: a rich bar. Elsewhere (CI, ``nohup``, ``tee``, a notebook) a bar would print
    nothing until it ends, so one plain line goes to stderr at the start, every ``LOG_EVERY`` seconds
    (step, loss, elapsed, estimate) and at the end."""
    import sys

    if not enabled:
        yield lambda loss: None
        return
    if not sys.stderr.isatty():
        log = ProgressLog(label, total)
        yield log.step
        log.done()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        tid = bar.add_task(label, total=total, loss="-")
        yield lambda loss: bar.update(tid, advance=1, loss=f"{loss:.3f}")


class ProgressLog:
    """Plain progress lines for logs: what a progress bar shows, a line every ``every`` seconds."""

    def __init__(self, label: str, total: int, every: float | None = None, stream=None, unit: str = "steps"):
        import sys
        import time

        self.label, self.total, self.n, self.loss, self.unit = label, total, 0, None, unit
        self.every = LOG_EVERY if every is None else every
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self._print(f"{label}: {total} {unit}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def step(self, loss: float | None = None) -> None:
        import time

        self.n += 1
        self.loss = loss if loss is not None else self.loss
        now = time.monotonic()
        if now - self.last >= self.every and self.n < self.total:
            self.last = now
            elapsed = now - self.start
            left = elapsed / self.n * (self.total - self.n)
            loss_text = "" if self.loss is None else f", loss {self.loss:.3f}"
            self._print(f"{self.label}: {self.unit.rstrip('s')} {self.n}/{self.total}{loss_text}, {elapsed:.0f} s elapsed, "
                        f"~{left:.0f} s left")

    def done(self) -> None:
        import time

        loss_text = "" if self.loss is None else f", loss {self.loss:.3f}"
        self._print(f"{self.label}: done, {self.n} {self.unit} in {time.monotonic() - self.start:.0f} s{loss_text}")


DEFAULT_THREADS = 1


def threads_from_env() -> int:
    """``$MOERGE_THREADS``, else 1: see ``set_threads``."""
    raw = os.environ.get("MOERGE_THREADS", "").strip()
    if not raw:
        return DEFAULT_THREADS
    if not raw.isdigit() or int(raw) < 1:
        raise MoergeError(f"MOERGE_THREADS={raw!r}: give a whole number of threads, 1 or more")
    return int(raw)


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count for everything that computes (training, evaluation, routing).

    Why 1 by default: the built-in base is tiny (hidden 128), so one core already runs it near full
    speed, and OpenMP threads spin-wait for each other: with a CPU-bound neighbour on a 2-core machine,
    two torch threads ran 4-16x slower than one (README: Threads). Pass more (``--threads``,
    ``MOERGE_THREADS``) for large models on an idle machine."""
    import torch

    n = threads_from_env() if n is None else n
    if n < 1:
        raise MoergeError(f"--threads {n}: give 1 or more")
    torch.set_num_threads(n)
    return n


def quiet_transformers() -> None:
    """transformers' own progress bars and advisory warnings would drown ours."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FIGURE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_figure(path: str | os.PathLike, what: str = "figure") -> Path:
    """A figure file the command will draw, checked before the work starts (folder, format)."""
    path = output_file(path, what)
    if path.suffix.lower() not in FIGURE_FORMATS:
        raise MoergeError(f"{path}: {what} are drawn as {', '.join(FIGURE_FORMATS)}; give a file name ending in one of them")
    return path


def save_figure(fig, path: Path) -> Path:
    """Write a figure under a temporary name and rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120)
    except OSError as e:
        raise MoergeError(f"{path}: cannot write the figure ({e.strerror or e}); choose another path") from None
    finally:
        pyplot().close(fig)
    return path
