"""What a command shows while it works: rich consoles, progress bars on a terminal and plain log
lines every few seconds elsewhere (CI, nohup, | tee), transformers' own bars silenced."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator


def console(stderr: bool = False):
    """A rich console; when writing to a file or pipe (logs, CI) it is 200 columns wide rather than
    rich's 80, so wide tables (the demo's scoreboard) stay readable. $COLUMNS still wins."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=200 if wide else None)


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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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


def quiet_transformers() -> None:
    """transformers' own progress bars and advisory warnings would drown ours."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)  # its note on offloaded weights (--device-map asked for it)
