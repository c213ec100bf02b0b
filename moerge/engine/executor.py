"""Streaming a plan to disk: load one tensor's inputs, merge, write, free.

Peak memory is a few tensors times the number of inputs, never a model. Worker threads overlap
reading (positioned reads release the GIL), math (torch kernels release the GIL) and writing
(positioned writes into pre-laid-out shards), and at most ``2 * workers`` tensors are in flight.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.io.writer import ShardedWriter, parse_size
from moerge.engine.card import write_extras
from moerge.engine.plan import Plan, TensorTask
from moerge.methods.registry import compute_dtype


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_task(plan: Plan, task: TensorTask) -> torch.Tensor:
    """Compute one output tensor (pure function of the plan and the inputs' bytes)."""
    models = plan.models
    if not task.floating:
        i, name = task.inputs[0]
        return models[i].source.get(name)

    def load(i: int, name: str) -> torch.Tensor:
        t = models[i].source.get(name)
        if plan.cast is not None and t.dtype != plan.cast:
            t = t.to(plan.cast)  # the recipe's dtype: inputs are rounded to it, as in mergekit
        return t

    raw = [load(i, n) for i, n in task.inputs]
    base = load(*task.base) if task.base else None
    work = compute_dtype([t.dtype for t in raw] + ([base.dtype] if base is not None else []))
    tensors = [t.to(work) if t.dtype != work else t for t in raw]
    del raw
    if base is not None and base.dtype != work:
        base = base.to(work)
    gen = torch.Generator().manual_seed(task.seed) if plan.method.random else None
    try:
        out = plan.method(base, tensors, generator=gen, **task.shared, **task.per_input)
    except MoergeError as e:
        raise MoergeError(f"tensor {task.name}: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise MoergeError(f"tensor {task.name}: {plan.method.name} failed ({e})") from None
    return out.to(task.out_dtype)


def _check_output(plan: Plan, out_dir: Path) -> None:
    out = out_dir.resolve()
    for m in plan.models:
        for p in (m.folder, m.lora):
            if p is None:
                continue
            p = p.resolve()
            if out == p or p.is_relative_to(out):
                raise MoergeError(f"{out_dir}: is (or contains) the input {m.ref}; write the merge to another folder")


def execute(
    plan: Plan,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    shard_size: str | int = "5B",
    progress: bool = True,
) -> MergeResult:
    out_dir = Path(out_dir)
    _check_output(plan, out_dir)
    start = time.perf_counter()
    workers = workers or min(4, os.cpu_count() or 1)
    writer = ShardedWriter(out_dir, [(t.name, t.shape, t.out_dtype) for t in plan.tasks], parse_size(shard_size), overwrite)
    done_bytes = 0
    lock = threading.Lock()
    try:
        with _progress(progress, len(plan.tasks), writer.total_bytes) as advance, _torch_threads(1 if workers > 1 else torch.get_num_threads()):

            def job(task: TensorTask) -> None:
                nonlocal done_bytes
                writer.write(task.name, run_task(plan, task))
                with lock:
                    done_bytes += task.nbytes
                advance(task.nbytes)

            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moerge")
            pending: set[Future] = set()
            try:
                # biggest first: a long tensor started last would leave the other workers idle
                for task in sorted(plan.tasks, key=lambda t: -t.nbytes):
                    if len(pending) >= 2 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            f.result()
                    pending.add(pool.submit(job, task))
                for f in pending:
                    f.result()
            finally:
                for f in pending:
                    f.cancel()
                pool.shutdown(wait=True)
        write_extras(plan, writer)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return MergeResult(out_dir, len(plan.tasks), done_bytes, time.perf_counter() - start)


@contextmanager
def _progress(enabled: bool, n_tensors: int, n_bytes: int):
    if not enabled:
        yield lambda nbytes: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    with Progress(
        TextColumn("[bold]merging"), BarColumn(), TextColumn("{task.fields[tensors]}"), DownloadColumn(),
        TransferSpeedColumn(), TimeElapsedColumn(), transient=False,
    ) as bar:
        tid = bar.add_task("merge", total=n_bytes, tensors=f"0/{n_tensors} tensors")
        count = 0
        lock = threading.Lock()

        def advance(nbytes: int) -> None:
            nonlocal count
            with lock:
                count += 1
                bar.update(tid, advance=nbytes, tensors=f"{count}/{n_tensors} tensors")

        yield advance
