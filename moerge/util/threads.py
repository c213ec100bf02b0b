"""The torch thread count: one by default (two threads on two busy cores spin and run 4-16x slower
than one; see the docs' operations page), ``--threads``/``$MOERGE_THREADS`` for more."""

from __future__ import annotations

import os

from moerge.errors import MoergeError

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
