#!/usr/bin/env python
"""LoRA-native merges against their dense counterparts, on experts trained by moerge.

    python bench/lora_merge.py demo-output/experts/{reverse,sort,uppercase,shift,dedupe,novowels}
    python bench/lora_merge.py real/experts/{acronym,caps,iso_date,number_words,reverse_words} --n 20

Each configuration (``--configs``: METHOD[:SPACE][:rank=K][:PARAM=VALUE ...], comma-separated) merges
every given expert into one LoRA (``moerge.merge_lora``) and is scored by exact match on each expert's
own task (test split, ``--n`` prompts), as ``moerge eval --adapter`` scores it; with ``--dense`` each
method's dense counterpart (the recipe the LoRA merge reports, through ``moerge.merge``) is merged and
scored too. Prints one row per merge: the rank written, the mean, its share of the experts' own mean
(each expert scored on its task), and the time the merge took.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DEFAULT = "iso_cts,iso_c,tsv,ties,ties:knots,task_arithmetic,iso_cts:rank=16"


def parse(config: str) -> tuple[str, str, int | None, dict]:
    method, *rest = config.split(":")
    space, rank, params = "core", None, {}
    for part in rest:
        key, eq, value = part.partition("=")
        if not eq:
            space = key
        elif key == "rank":
            rank = int(value)
        else:
            params[key] = float(value)
    return method, space, rank, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experts", nargs="+", type=Path, help="LoRA expert folders trained by moerge (each names its task)")
    ap.add_argument("--n", type=int, default=100, help="test prompts per task")
    ap.add_argument("--configs", default=DEFAULT, help=f"merges to run (default {DEFAULT})")
    ap.add_argument("--dense", action="store_true", help="also merge and score each method's dense counterpart")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one: robust beside other work)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    import moerge
    from moerge.experts.card import ExpertCard

    tasks = [ExpertCard.read(e).task for e in args.experts]
    own = {t: moerge.evaluate(adapter=e, tasks=t, n=args.n).scores[t] for t, e in zip(tasks, args.experts)}
    experts_mean = sum(own.values()) / len(own)
    rows = [("each expert on its own task", "-", experts_mean, None)]
    dense_done = set()
    with tempfile.TemporaryDirectory(prefix="moerge-lora-bench-") as d:
        for i, config in enumerate(c.strip() for c in args.configs.split(",") if c.strip()):
            method, space, rank, params = parse(config)
            t0 = time.perf_counter()
            res = moerge.merge_lora(args.experts, Path(d) / f"lora{i}", method=method, params=params, space=space, rank=rank)
            seconds = time.perf_counter() - t0
            scores = moerge.evaluate(adapter=Path(d) / f"lora{i}", tasks=",".join(tasks), n=args.n).scores
            ranks = sorted(set(res.ranks.values()))
            shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            rows.append((f"LoRA {config}", shown, sum(scores.values()) / len(scores), seconds))
            if args.dense and space == "core" and rank is None and (method, tuple(params.items())) not in dense_done:
                dense_done.add((method, tuple(params.items())))
                (Path(d) / f"dense{i}.yaml").write_text(res.report["dense_recipe"])
                t0 = time.perf_counter()
                moerge.merge(Path(d) / f"dense{i}.yaml", Path(d) / f"dense{i}")
                seconds = time.perf_counter() - t0
                dense = moerge.evaluate(Path(d) / f"dense{i}", tasks=",".join(tasks), n=args.n).scores
                rows.append((f"dense {method} {params or ''}".rstrip(), "full", sum(dense.values()) / len(dense), seconds))
    print(f"| merge of {len(tasks)} experts ({', '.join(tasks)}) | rank | mean | share of the experts' {experts_mean:.0%} | merge s |")
    print("|---|---|---|---|---|")
    for name, rank, mean, seconds in rows:
        share = f"{mean / experts_mean:.0%}" if experts_mean and seconds is not None else ""
        print(f"| {name} | {rank} | {mean:.1%} | {share} | {'' if seconds is None else f'{seconds:.1f}'} |")


if __name__ == "__main__":
    main()
