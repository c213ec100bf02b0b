"""DPO after merging, measured: a model (e.g. a merge of experts) tuned with `moerge tune dpo` on
preferences for one skill, where the rejected answer is the model's own wrong greedy answer.

    python bench/dpo_after_merge.py MODEL --skill sort_words --pairs 300 --steps 60 [--out DIR]

Prints a table: on the held-out pairs, how often the chosen answer is preferred (higher log-likelihood)
and generated exactly, before and after; and exact match on the skill's test split (and the mean
over the other given skills, to see what tuning one skill costs the rest).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="A model folder (a merge's output) or a real base's name.")
    ap.add_argument("--skill", default="sort_words")
    ap.add_argument("--others", default="real-experts", help="Tasks to score before and after besides the skill.")
    ap.add_argument("--pairs", type=int, default=300, help="Training prompts to build pairs from.")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--sft-weight", type=float, default=None, help="RPO's weight of the chosen answers' NLL (default: tune_dpo's).")
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="Keep the DPO adapter here (default: a temporary folder).")
    args = ap.parse_args()

    from moerge.eval import evaluate, resolve_tasks
    from moerge.lm import base as base_model
    from moerge.lm.generate import greedy
    from moerge.tasks import examples
    from moerge.train.dpo import tune_dpo
    from moerge.train.expert import load_expert
    from moerge.util.threads import set_threads

    set_threads(args.threads)
    model_dir = base_model.resolve(args.model)
    model, tok = base_model.load(model_dir)
    tasks = [args.skill] + [t for t in resolve_tasks(args.others) if t != args.skill]
    t0 = time.perf_counter()
    before = evaluate(model, tok, tasks, n=args.n_test)
    rows = examples(args.skill, "train", args.pairs, 0)
    answers = greedy(model, tok, [r.prompt for r in rows], max_new_tokens=48, batch_size=16)
    pairs = [{"prompt": r.prompt, "chosen": r.completion, "rejected": a} for r, a in zip(rows, answers) if a != r.completion]
    print(f"{len(pairs)} pairs from {len(rows)} prompts (the model's own wrong answers rejected); "
          f"{time.perf_counter() - t0:.0f} s to score and build them", flush=True)
    del model
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{args.skill}_prefs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        out = args.out or Path(tmp) / "dpo"
        card = tune_dpo(out, data=data, model=model_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        **({} if args.sft_weight is None else {"sft_weight": args.sft_weight}),
                        beta=args.beta, overwrite=args.out is not None)
        tuned, ttok = load_expert(model_dir, out)
        after = evaluate(tuned, ttok, tasks, n=args.n_test)
    d = card.extra["dpo"]
    others = tasks[1:]
    mean = lambda s: sum(s[t] for t in others) / max(1, len(others))  # noqa: E731
    print(f"\nDPO ({card.adapter}, {args.steps} steps, batch {args.batch_size}, lr {card.lr}, beta {args.beta}, "
          f"sft weight {d['sft_weight']}) of "
          f"{model_dir} on {card.examples} pairs: {card.seconds:.0f} s\n")
    print("| | before | after |\n|---|---|---|")
    print(f"| held-out pairs ({d['held_out_pairs']}): chosen preferred | {d['before']['preference_accuracy']:.1%} | "
          f"{d['after']['preference_accuracy']:.1%} |")
    print(f"| held-out pairs: chosen generated exactly | {d['before']['exact_match']:.1%} | {d['after']['exact_match']:.1%} |")
    print(f"| {args.skill} test exact match ({args.n_test}) | {before[args.skill]:.1%} | {after[args.skill]:.1%} |")
    if others:
        print(f"| mean of {', '.join(others)} | {mean(before):.1%} | {mean(after):.1%} |")


if __name__ == "__main__":
    main()
