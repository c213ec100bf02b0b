#!/usr/bin/env python
"""Peak memory of RegMean's statistics, computed layer by layer, against holding the model whole.

    python bench/stats_memory.py smollm2-135m-instruct --task caps --examples 64

Each row is a fresh process (its peak resident set from ``getrusage``): ``imports`` only loads torch
and transformers; ``whole model`` loads the model in float32 as a whole-model statistics pass must
(the least such a pass needs, before any activations); ``gram, layer by layer`` computes the Gram
matrices of every linear layer on the examples with ``engine/stats.py`` (one decoder layer's weights
in memory at a time, each layer's matrices written when it is done), into a throwaway cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(1)
import transformers
what, model, task, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
if what != "imports":
    from moerge.lm.base import resolve as resolve_base
    from moerge.engine.plan import open_model
    ref = open_model(str(resolve_base(model)))
    if what == "whole":
        from moerge.engine.dense import load_dense
        load_dense(ref, torch.float32)
    else:
        from moerge.engine import stats
        from moerge.tasks import examples
        stats.compute(ref, "gram", examples(task, "train", n), task)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "s": time.perf_counter() - start}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model folder or a base name (`moerge base list`)")
    ap.add_argument("--task", default="caps", help="a built-in task or JSONL whose training rows are the examples")
    ap.add_argument("--examples", type=int, default=64)
    args = ap.parse_args()
    from moerge.lm.base import resolve

    folder = str(resolve(args.model))  # before the children get a throwaway cache
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label, what in (("imports", "imports"), ("whole model, float32", "whole"), ("gram, layer by layer", "gram")):
            out = subprocess.run([sys.executable, "-c", CHILD, what, folder, args.task, str(args.examples)],
                                 capture_output=True, text=True, env={**__import__("os").environ, "MOERGE_CACHE": cache,
                                                                      "OMP_NUM_THREADS": "1"})
            if out.returncode:
                sys.exit(f"{label}: failed:\n{out.stderr[-2000:]}")
            rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"| {args.model}, {args.examples} examples of {args.task} | peak RSS | seconds |")
    print("|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['peak_mb']:.0f} MB | {r['s']:.1f} |")


if __name__ == "__main__":
    main()
