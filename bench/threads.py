"""Torch threads on a busy machine: how long one expert's training takes with 1 or 2 threads (and
OpenMP's spin or passive wait), on idle cores and beside one CPU-bound neighbour (``yes > /dev/null``).

    python bench/threads.py [--steps 60] [--repeats 1]

Each cell is ``moerge expert train --task reverse`` in a fresh process, timed by the card's own
training seconds (imports and evaluation excluded). Prints a table; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [
    ("1 thread (moerge's default)", "1", {}),
    ("2 threads, OpenMP spin-wait (torch's default)", "2", {"OMP_WAIT_POLICY": "ACTIVE"}),
    ("2 threads, OpenMP passive wait", "2", {"OMP_WAIT_POLICY": "PASSIVE"}),
]


def train_seconds(threads: str, env: dict, steps: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "moerge.cli", "--threads", threads, "expert", "train", "--task", "reverse",
           "--steps", str(steps), "--out", str(out), "--overwrite"]
    full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")} | env
    subprocess.run(cmd, check=True, env=full_env, capture_output=True, text=True)
    return json.loads((out / "expert.json").read_text())["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, threads, env in CONFIGS:
            times = {}
            for loaded in (False, True):
                hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if loaded else None
                try:
                    runs = [train_seconds(threads, env, args.steps, Path(tmp) / "e") for _ in range(args.repeats)]
                finally:
                    if hog:
                        hog.kill()
                        hog.wait()
                times[loaded] = statistics.median(runs)
            rows.append((label, times[False], times[True]))
    best_idle = min(r[1] for r in rows)
    print(f"| {args.steps} training steps of a LoRA expert | idle s | beside `yes` s | loaded / idle | loaded / best idle |")
    print("|---|---|---|---|---|")
    for label, idle, busy in rows:
        print(f"| {label} | {idle:.1f} | {busy:.1f} | {busy / idle:.2f} | {busy / best_idle:.2f} |")


if __name__ == "__main__":
    main()
