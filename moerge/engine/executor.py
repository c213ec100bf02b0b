"""Streaming a plan to disk: load one tensor's inputs, merge, write, free.

Peak memory is a few tensors times the number of inputs, never a model. Worker threads overlap
reading (positioned reads release the GIL), math (torch kernels release the GIL) and writing
(positioned writes into pre-laid-out shards), under a memory budget (see ``schedule``).
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

from moerge.engine.card import write_extras
from moerge.engine.plan import Plan, TensorTask
from moerge.engine.stats import ensure as ensure_stats
from moerge.errors import MoergeError
from moerge.io.writer import ShardedWriter, parse_size
from moerge.lm import device as devices
from moerge.methods.blocks import DEFAULT_BLOCK
from moerge.methods.registry import compute_dtype
from moerge.util.progress import ProgressLog


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float
    stages: int = 1  # a multi-document recipe: how many merges made it
    report: object = None  # eval.report.MergeReport when the merge was asked to score itself (--eval)


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_task(plan: Plan, task: TensorTask, block: int = DEFAULT_BLOCK, device: torch.device | None = None) -> torch.Tensor:
    """Compute one output tensor (pure function of the plan and the inputs' bytes), on ``device``
    (None: the CPU). Inputs are read on the CPU and sent there one tensor at a time; random masks are
    drawn on the CPU from the tensor's seed and sent too, so a merge is the same on every device."""
    models = plan.models
    if not task.floating:
        i, name = task.inputs[0]
        return models[i].source.get(name)
    read = _reader(plan, task)

    def load(i: int, name: str) -> torch.Tensor:
        t = devices.send(read(i, name), device)
        if plan.cast is not None and t.dtype != plan.cast:
            t = t.to(plan.cast)  # the recipe's dtype: inputs are rounded to it, as in mergekit
        return t

    gen = torch.Generator().manual_seed(task.seed) if plan.method.random else None
    if plan.method.blockwise:
        # inputs stay in their storage dtype; blocks are widened (and rounded to the recipe dtype) as they go
        stored = [devices.send(read(i, n), device) for i, n in task.inputs]
        base = devices.send(read(*task.base), device) if task.base else None
        dtypes = [plan.cast] if plan.cast is not None else [t.dtype for t in stored] + ([base.dtype] if base is not None else [])
        work = compute_dtype(dtypes)
        return _guarded(task, plan, lambda: plan.method.stream(
            base, stored, work=work, out_dtype=task.out_dtype, cast=plan.cast, block=block, generator=gen,
            **task.shared, **task.per_input))
    params = {**task.shared, **task.per_input}
    if plan.method.extra.get("tensor_name"):  # methods whose math is for layer matrices only (not token tables)
        params["name"] = task.name
    if plan.method.stats:
        if plan.stats is None:
            raise MoergeError(f"{plan.method.name}: the inputs' statistics were not gathered (engine.stats.gather) before the merge")
        params = {k: v for k, v in params.items() if not plan.method.param(k).for_stats}
        params["stats"] = [devices.send(s, device) if s is not None else None
                           for s in (plan.stats[i].get(n) if plan.stats[i] else None for i, n in task.inputs)]
        params["stats_scale"] = [plan.stats[i].scale if plan.stats[i] else 1.0 for i, _ in task.inputs]
        params["layout"] = next((plan.stats[i].layout(n) for i, n in task.inputs if plan.stats[i]), None)
    raw = [load(i, n) for i, n in task.inputs]
    base = load(*task.base) if task.base else None
    work = compute_dtype([t.dtype for t in raw] + ([base.dtype] if base is not None else []))
    tensors = [t.to(work) if t.dtype != work else t for t in raw]
    del raw
    if base is not None and base.dtype != work:
        base = base.to(work)
    return _guarded(task, plan, lambda: plan.method(base, tensors, generator=gen, **params)).to(task.out_dtype)


def merge_tensors(plan: Plan, progress: bool = False, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The merged model's tensors in memory, nothing written (a merge search scores many candidates):
    the same ``run_task`` per tensor as ``execute``, so the tensors equal a written merge's."""
    ensure_stats(plan, progress)
    return {task.name: _home(run_task(plan, task, device=device)) for task in plan.tasks}


def _home(t: torch.Tensor) -> torch.Tensor:
    """A merged tensor back in host memory, where it is written (one copy per tensor)."""
    return t if t.device.type == "cpu" else t.to("cpu")


def _reader(plan: Plan, task: TensorTask):
    """How a task reads its inputs: straight from the sources, or, for embeddings whose inputs'
    vocabularies differ, every input permuted onto the output vocabulary at once (engine/vocab.py)."""
    models = plan.models
    if plan.alignment is None or task.name not in plan.alignment.names:
        return lambda i, name: models[i].source.get(name)
    wanted = dict(task.inputs + ([task.base] if task.base else []))
    aligned = plan.alignment.apply(task.name, {i: models[i].source.get(n) for i, n in wanted.items()})
    return lambda i, name: aligned[i]


def _guarded(task: TensorTask, plan: Plan, compute) -> torch.Tensor:
    try:
        return compute()
    except MoergeError as e:
        raise MoergeError(f"tensor {task.name}: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise MoergeError(f"tensor {task.name}: {plan.method.name} failed ({e})") from None


def working_bytes(task: TensorTask) -> int:
    """What a task holds at its peak, roughly: its inputs and output widened to float32, plus
    whole-tensor statistics (a float32 copy for selection by rank, masks)."""
    numel = task.nbytes // max(1, task.out_dtype.itemsize)
    return numel * 4 * (len(task.inputs) + (task.base is not None) + 2)


def schedule(pool: ThreadPoolExecutor, job, tasks: list, workers: int, cost=working_bytes, budget: int | None = None) -> None:
    """Run ``job`` on every task, biggest first, at most ``workers`` at once, and only as many as fit
    a memory budget: the largest tasks (embeddings, LM head) run beside small ones, not beside each
    other, which bounds peak memory without idling a worker."""
    remaining = sorted(tasks, key=cost, reverse=True)
    if not remaining:
        return
    costs = {id(t): cost(t) for t in remaining}
    budget = budget or max(512 << 20, int(1.25 * costs[id(remaining[0])]))
    running: dict[Future, int] = {}
    used = 0
    while remaining or running:
        i = 0
        while len(running) < workers and i < len(remaining):
            c = costs[id(remaining[i])]
            if used + c <= budget or not running:
                running[pool.submit(job, remaining.pop(i))] = c
                used += c
            else:
                i += 1
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for f in finished:
            used -= running.pop(f)
            f.result()


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
    device: torch.device | None = None,
) -> MergeResult:
    """Write the plan's merge to ``out_dir``, tensor by tensor, each computed on ``device`` (None: the
    CPU; mergekit's ``--cuda``): only the tensors in flight are on the device, as in host memory."""
    out_dir = Path(out_dir)
    _check_output(plan, out_dir)
    start = time.perf_counter()
    ensure_stats(plan, progress)  # data-aware: each input's statistics first (cached)
    workers = workers or min(4, os.cpu_count() or 1)
    writer = ShardedWriter(out_dir, [(t.name, t.shape, t.out_dtype) for t in plan.tasks], parse_size(shard_size), overwrite)
    done_bytes = 0
    lock = threading.Lock()
    try:
        with _progress(progress, len(plan.tasks), writer.total_bytes) as advance, _torch_threads(1 if workers > 1 else torch.get_num_threads()):

            def job(task: TensorTask) -> None:
                nonlocal done_bytes
                writer.write(task.name, _home(run_task(plan, task, device=device)))
                with lock:
                    done_bytes += task.nbytes
                advance(task.nbytes)

            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moerge")
            try:
                schedule(pool, job, plan.tasks, workers)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        write_extras(plan, writer)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return MergeResult(out_dir, len(plan.tasks), done_bytes, time.perf_counter() - start)


@contextmanager
def _progress(enabled: bool, n_tensors: int, n_bytes: int):
    """A rich bar on a terminal; elsewhere (logs, CI) a plain line every few seconds (``ProgressLog``)."""
    import sys

    if not enabled:
        yield lambda nbytes: None
        return
    if not sys.stderr.isatty():

        log, lock = ProgressLog("merging", n_tensors, unit="tensors"), threading.Lock()

        def step(nbytes: int) -> None:
            with lock:
                log.step()

        yield step
        log.done()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

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
