"""The compute dtype on this CPU: float32 against bf16 for a bf16 checkpoint (moerge.lm.precision).

    python bench/precision.py [--base smollm2-135m-instruct] [--task caps] [--steps 40] [--threads 1]

For each dtype, in a fresh process (``MOERGE_DTYPE``): one LoRA expert trained (``expert train``:
its card's training seconds, validation exact match), then its greedy generation on 30 test prompts
(seconds, exact match), and the Fisher statistics of base+expert on 32 examples (a one-expert
``fisher`` merge, its statistics cached nowhere else). Also one matmul of a training step's shape.
Prints a table; compare within one run (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from moerge.util.threads import set_threads
set_threads(int(sys.argv[1]))
from moerge.lm import base as B
from moerge.lm.generate import exact_match
from moerge.tasks.data import examples
from moerge.train.expert import load_expert
model, tok = load_expert(sys.argv[2], sys.argv[3])
rows = examples(sys.argv[4], "test", 30)
exact_match(model, tok, rows[:2])
t = time.perf_counter()
acc = exact_match(model, tok, rows)
print(json.dumps({"seconds": time.perf_counter() - t, "exact": acc, "dtype": str(model.get_base_model().dtype)}))
"""


def run(cmd: list[str], env: dict) -> str:
    """A child process's stdout; its own one-line error if it fails."""
    from moerge.errors import MoergeError

    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise MoergeError((res.stderr.strip().splitlines() or ["failed"])[-1].removeprefix("error: "))
    return res.stdout


def matmul_gflops(dtype) -> float:
    import torch

    a, w = torch.randn(448, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    a @ w.T
    t = time.perf_counter()
    for _ in range(20):
        a @ w.T
    return 20 * 2 * 448 * 576 * 1536 / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="caps")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from moerge.lm import base as base_model

    torch.set_num_threads(args.threads)
    base = base_model.resolve(args.base)
    base_model.check_model_folder(base, "base")
    rows = []
    with tempfile.TemporaryDirectory(prefix="moerge-bench-precision-") as tmp:
        for dtype in ("float32", "bfloat16"):
            env = dict(os.environ, MOERGE_DTYPE=dtype, MOERGE_CACHE=str(Path(tmp) / f"cache-{dtype}"))
            out = Path(tmp) / dtype
            cmd = [sys.executable, "-m", "moerge.cli", "--threads", str(args.threads), "expert", "train", "--base", str(base),
                   "--task", args.task, "--steps", str(args.steps), "--batch-size", "8", "--lr", "2e-3",
                   "--out", str(out)]
            run(cmd, env)
            card = json.loads((out / "expert.json").read_text())
            gen = json.loads(run([sys.executable, "-c", CHILD, str(args.threads), str(base), str(out), args.task],
                                 env).strip().splitlines()[-1])
            recipe = Path(tmp) / f"fisher-{dtype}.yaml"
            recipe.write_text(f"merge_method: fisher\nmodels:\n  - model: {base}+{out}\nparameters:\n  num_examples: 32\n"
                              "dtype: float32\n")
            t = time.perf_counter()
            run([sys.executable, "-m", "moerge.cli", "--threads", str(args.threads), "merge", str(recipe),
                 str(Path(tmp) / f"merged-{dtype}")], env)
            fisher_s = time.perf_counter() - t
            rows.append((dtype, matmul_gflops(getattr(torch, dtype)), card["seconds"], card["validation_accuracy"],
                         gen["seconds"], gen["exact"], fisher_s))
    print(f"{args.base}, LoRA r=8 on {args.task}, {args.steps} steps at batch 8, {args.threads} thread(s)\n")
    print("| compute dtype | matmul GFLOPS | training s | validation | generation s (30 prompts) | test exact | fisher merge s |")
    print("|---|---|---|---|---|---|---|")
    for name, gf, tr, val, gs, ex, fs in rows:
        print(f"| {name} | {gf:.0f} | {tr:.1f} | {val:.0%} | {gs:.1f} | {ex:.0%} | {fs:.1f} |")


if __name__ == "__main__":
    from moerge.errors import MoergeError

    try:
        main()
    except MoergeError as e:  # a wrong path or name: one line, as the CLI gives it
        raise SystemExit(f"error: {e}") from None
