"""The device acceptance run (issue 31): the loop on the chosen device, timed against the CPU.

    python bench/device_check.py --device cuda [--base smollm2-135m-instruct] [--steps 100] [--n 50]
    python bench/device_check.py --device cpu --quick        # what the suite runs (tests/test_device.py)

For each of the chosen device and the CPU, in this process: two LoRA experts trained (sort, reverse on
the built-in base; the real suite's reverse_words and caps on a real base), each scored on its own task,
both added to a fresh library, merged (task arithmetic, streamed by the engine, each tensor computed on
the device), the merge scored, the
centroid and Arrow routers scored over the library (the mixture runtime on the device), and the server
answering a burst of requests to each expert and the router (continuous batching on the device). The
library step is file work on the CPU (``cpu`` in the device column), so the table says what ran where. Prints one table: step, where it ran, seconds on the device and on the
CPU, their ratio, and the scores (the same on both, up to bf16 rounding when the device computes in
bf16). On a CUDA machine this is the run that accepts the device paths; none of this project's
machines has a GPU, so the numbers in the docs are the CPU's against itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def run(where: str, base: str | None, tasks: list[str], steps: int, n: int, root: Path) -> list[tuple]:
    """[(step, ran on, seconds, score)] of the loop on ``where``."""
    from moerge.api import evaluate, evaluate_router, merge, train_expert
    from moerge.library import Library
    from moerge.lm.device import resolve

    device = str(resolve(where))
    rows = []

    def timed(step, ran_on, fn):
        print(f"{where}: {step} ...", file=sys.stderr, flush=True)  # progress, also when the table goes to a file
        start = time.perf_counter()
        score = fn()
        rows.append((step, ran_on, time.perf_counter() - start, score))

    for t in tasks:
        timed(f"train {t}", device, lambda t=t: train_expert(root / t, base=base, task=t, steps=steps, batch_size=16,
                                                              n_val=20, progress=False, device=where).validation_accuracy)
        timed(f"eval {t} expert", device, lambda t=t: evaluate(adapter=root / t, tasks=t, n=n, device=where).mean)
    lib = Library.init(root / "lib", base)
    timed("library add", "cpu", lambda: [lib.add(root / t, t) and None for t in tasks] and None)
    recipe = {"merge_method": "task_arithmetic", "base_model": "library://base",
              "models": [{"model": f"library://{t}", "parameters": {"weight": 1.0}} for t in tasks]}
    timed("merge (task arithmetic)", device, lambda: merge(recipe, root / "merged", library=lib.root, device=where) and None)
    timed("eval merge", device, lambda: evaluate(root / "merged", tasks=",".join(tasks), n=n, device=where).mean)
    for r in ("centroid", "arrow"):
        timed(f"route eval {r}", device, lambda r=r: evaluate_router(r, library=lib.root, tasks=",".join(tasks), n=n,
                                                                     device=where).mean)
    timed("serve 4 requests per expert and router", device, lambda: serve_burst(lib.root, tasks, where))
    return rows


def serve_burst(library: Path, tasks: list[str], where: str) -> float:
    """The server on ``where``: each expert and the centroid router asked 4 prompts of the experts' tasks
    at once (one continuous batch); the share of answers that equal the same request asked alone."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from moerge.serve import Server
    from moerge.tasks.data import examples

    prompts = [ex.prompt for t in tasks for ex in examples(t, "test", 2, seed=1)]
    with Server(library=str(library), routers=["centroid"], device=where) as s:
        c = OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        ask = lambda job: c.completions.create(model=job[0], prompt=job[1], max_tokens=12,  # noqa: E731
                                               temperature=0).choices[0].text
        jobs = [(m, p) for m in [*tasks, "router:centroid"] for p in prompts]
        alone = [ask(j) for j in jobs[:: len(prompts)]]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(ask, jobs))
    return sum(a == b for a, b in zip(alone, together[:: len(prompts)])) / len(alone)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--base", default=None, help="a base folder or a real base's name (default: the built-in base)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n", type=int, default=50, help="test prompts per task")
    p.add_argument("--quick", action="store_true", help="2 steps, 4 prompts: a smoke run (the suite's)")
    a = p.parse_args(argv)
    from moerge.errors import MoergeError
    from moerge.lm.chat import uses_chat
    from moerge.lm.device import resolve
    from moerge.util.threads import set_threads

    set_threads(None)
    steps, n = (2, 4) if a.quick else (a.steps, a.n)
    try:
        chosen = resolve(a.device)
        if a.base is None:
            tasks = ["sort", "reverse"]
        else:
            from transformers import AutoTokenizer

            from moerge.lm.base import resolve as resolve_base

            chat = uses_chat(AutoTokenizer.from_pretrained(resolve_base(a.base)))
            tasks = ["reverse_words", "caps"] if chat else ["sort", "reverse"]
        with tempfile.TemporaryDirectory() as tmp:
            on_device = run(str(chosen), a.base, tasks, steps, n, Path(tmp) / "device")
            on_cpu = on_device if chosen.type == "cpu" else run("cpu", a.base, tasks, steps, n, Path(tmp) / "cpu")
    except MoergeError as e:
        sys.exit(f"error: {e}")
    print(f"device check: {chosen} against cpu, {steps} training steps, {n} test prompts per task")
    print(f"| step | ran on | {chosen} s | cpu s | ratio | score ({chosen}) | score (cpu) |")
    print("|---|---|---|---|---|---|---|")
    for (step, ran_on, s, score), (_, _, c, cpu_score) in zip(on_device, on_cpu):
        fmt = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
        print(f"| {step} | {ran_on} | {s:.2f} | {c:.2f} | {c / s if s else float('nan'):.2f}x | {fmt(score)} | {fmt(cpu_score)} |")


if __name__ == "__main__":
    main()
