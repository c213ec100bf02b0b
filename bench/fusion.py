"""The ColD Fusion claim on the built-in suite: after R rounds of K contributors, is the fused base a
better starting point for held-out skills than the original base, and does seen-skill accuracy rise?

    python bench/fusion.py [--seeds 0,1] [--rounds 5] [--contributors 4] [--steps 100] [--finetune-steps 40]
                           [--method average] [--param NAME=VALUE ...] [--lr LR]

Runs `moerge fuse simulate` once per seed (full fine-tunes fused by averaging, the paper's setting) and
prints, per round, the means over seeds: zero-shot accuracy on the contributor skills seen so far (and
the original base's on the same skills), and the held-out composites' accuracy after the same short
fine-tune from the fused base and from the original base. Results per seed go to --out/seedS.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _param(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    return name.strip(), float(value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contributors", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--finetune-steps", type=int, default=40)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--adapter", default="full")
    ap.add_argument("--method", default="average")
    ap.add_argument("--seen-finetune", action="store_true", help="also the seen tasks after a short fine-tune")
    ap.add_argument("--lr", type=float, default=None, help="contributors' learning rate")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a parameter of --method")
    ap.add_argument("--out", default=None, help="keep the per-seed JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from moerge.fusion import simulate
    from moerge.util.threads import set_threads

    set_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="moerge-fusion-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for s in [int(x) for x in args.seeds.split(",")]:
        res = simulate(out / f"seed{s}", rounds=args.rounds, contributors=args.contributors, adapter=args.adapter,
                       method=args.method, lr=args.lr, seen_finetune=args.seen_finetune, parameters=dict(_param(p) for p in args.param), steps=args.steps, finetune_steps=args.finetune_steps, n_eval=args.n_eval,
                       seed=s, json_file=out / f"seed{s}.json", overwrite=True)
        runs.append(res)
        print(f"seed {s}: {res['seconds']:.0f} s", file=sys.stderr, flush=True)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    print(f"ColD Fusion on the built-in suite: {len(runs)} seed(s), {args.rounds} rounds x {args.contributors} contributors "
          f"({args.adapter}, {args.method} {args.param or ''}, {args.steps} steps, lr {args.lr or 'default'}); held-out: {', '.join(runs[0]['heldout_tasks'])} "
          f"({args.finetune_steps}-step fine-tune)")
    ft = args.seen_finetune
    extra = f"  {'seen ft (fused)':>15}  {'seen ft (original)':>18}" if ft else ""
    print(f"{'round':>5}  {'seen (fused)':>12}  {'seen (original)':>15}  {'all skills':>10}{extra}  {'held-out ft (fused)':>19}  "
          f"{'held-out ft (original)':>22}")
    o = [r["original"] for r in runs]
    blank = f"  {'':>15}  {'':>18}" if ft else ""
    print(f"{0:>5}  {'':>12}  {'':>15}  {mean(x['seen'] for x in o):>10.1%}{blank}  {mean(x['heldout_finetuned'] for x in o):>19.1%}  "
          f"{mean(x['heldout_finetuned'] for x in o):>22.1%}")
    for i in range(args.rounds):
        rs = [r["rounds"][i] for r in runs]
        cells = (f"  {mean(x['seen_finetuned'] for x in rs):>15.1%}  {mean(x['seen_finetuned_original'] for x in rs):>18.1%}"
                 if ft else "")
        print(f"{i + 1:>5}  {mean(x['seen'] for x in rs):>12.1%}  {mean(x['seen_original'] for x in rs):>15.1%}  "
              f"{mean(x['all'] for x in rs):>10.1%}{cells}  {mean(x['heldout_finetuned'] for x in rs):>19.1%}  "
              f"{mean(x['heldout_finetuned'] for x in o):>22.1%}")
    print(json.dumps({"per_seed_final_heldout": [r["rounds"][-1]["heldout_finetuned"] for r in runs],
                      "per_seed_original_heldout": [r["original"]["heldout_finetuned"] for r in runs]}))


if __name__ == "__main__":
    main()
