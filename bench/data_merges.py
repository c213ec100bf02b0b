#!/usr/bin/env python
"""Data-aware merges against the data-free ones, on experts trained by moerge (the demo's, say).

    python bench/data_merges.py demo-output/experts/{reverse,sort,uppercase,shift,dedupe,novowels}
    python bench/data_merges.py real/experts/{reverse_words,sort_words,caps,number_words,acronym,iso_date} --n 30 --examples 64

Each method merges every given expert (``base+expert``, the base from the expert's card) through the
merge engine, and the merge is scored by exact match on each expert's own task (test split): linear,
task_arithmetic (λ = --lambda), ties and dare_ties (density 0.5), fisher and regmean (each expert's
statistics on --examples examples of its card's training data; RegMean's alpha --alpha). Prints one
row per method with the time its merge took (statistics included; a second run finds them cached).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experts", nargs="+", type=Path, help="expert folders trained by moerge (each names its task)")
    ap.add_argument("--n", type=int, default=100, help="test prompts per task")
    ap.add_argument("--examples", type=int, default=256, help="examples per expert for Fisher and RegMean statistics")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0, help="task arithmetic's weight per expert")
    ap.add_argument("--alpha", type=float, default=0.6, help="RegMean's off-diagonal scale")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,fisher,regmean")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one: robust beside other work)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    import moerge
    from moerge.eval import evaluate
    from moerge.experts.card import ExpertCard
    from moerge.lm import base as base_model
    from moerge.util.progress import quiet_transformers

    quiet_transformers()
    cards = {p: ExpertCard.read(p) for p in args.experts}
    bases = {c.base for c in cards.values()}
    if len(bases) != 1:
        raise SystemExit(f"the experts were trained on different bases: {sorted(bases)}")
    base = bases.pop()
    tasks = [c.task for c in cards.values()]
    params = {"linear": {"weight": 1.0}, "task_arithmetic": {"weight": args.lam}, "ties": {"weight": 1.0, "density": 0.5},
              "dare_ties": {"weight": 1.0, "density": 0.5}, "fisher": {"weight": 1.0},
              "regmean": {"weight": 1.0}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            recipe = {"merge_method": method, "models": [{"model": f"{base}+{p}", "parameters": params[method]} for p in cards],
                      "dtype": "float32"}
            if method in ("task_arithmetic", "ties", "dare_ties"):
                recipe["base_model"] = base
            if method in ("fisher", "regmean"):
                recipe["parameters"] = {"num_examples": args.examples, **({"alpha": args.alpha} if method == "regmean" else {})}
            t0 = time.perf_counter()
            res = moerge.merge(recipe, Path(tmp) / method, progress=False)
            seconds = time.perf_counter() - t0
            model, tok = base_model.load(res.out_dir)
            scores = evaluate(model, tok, tasks, n=args.n)
            rows.append((method, scores, seconds))
            print(f"{method}: mean {sum(scores.values()) / len(scores):.1%} ({seconds:.0f} s)", flush=True)
    print(f"\n| method | {' | '.join(tasks)} | mean | merge s |\n|---|" + "---|" * (len(tasks) + 2))
    for method, scores, seconds in rows:
        print(f"| {method} | " + " | ".join(f"{scores[t]:.0%}" for t in tasks)
              + f" | {sum(scores.values()) / len(scores):.1%} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
