"""In-context learning versus parameter-efficient fine-tuning on the same k examples (the T-Few claim:
(IA)³ trained on the few examples beats k-shot prompting, and answers faster).

    python bench/icl_vs_peft.py [--base smollm2-135m-instruct] [--k 4,16,64] [--n 20]
                                [--tasks reverse_words_caps,sort_words_acronym]

For each held-out skill and each k: the base prompted with k demonstrations (earlier chat turns: user
prompt, assistant answer), and an (IA)³ and a LoRA adapter trained on the same k examples and asked
with no demonstrations; exact match on n test prompts, and the inference time per example. One run,
one torch thread; the machine is shared, so compare within a run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def icl_scores(model, tok, shots, rows, batch_size: int = 4) -> tuple[float, float]:
    """Exact match and seconds per example of k-shot prompting: the shots as earlier chat turns."""
    import torch

    history = []
    for s in shots:
        history += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.completion}]
    texts = [tok.apply_chat_template(history + [{"role": "user", "content": r.prompt}], add_generation_prompt=True,
                                     tokenize=False) for r in rows]
    longest = max(len(x) for x in tok([r.completion for r in rows], add_special_tokens=False)["input_ids"]) + 2
    right, start = 0, time.perf_counter()
    tok.padding_side = "left"
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=longest, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for row, r in zip(out[:, enc["input_ids"].shape[1]:].tolist(), rows[i:i + batch_size]):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            right += tok.decode(row, skip_special_tokens=True) == r.completion
    return right / len(rows), (time.perf_counter() - start) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--k", default="4,16,64")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--tasks", default="reverse_words_caps,sort_words_acronym")
    ap.add_argument("--steps", type=int, default=40, help="training steps of each adapter")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from moerge.lm import base as base_model
    from moerge.lm.generate import exact_match
    from moerge.tasks import examples
    from moerge.tasks.data import write_jsonl
    from moerge.train.expert import load_expert, train_expert
    from moerge.util.progress import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(1)
    ks = [int(k) for k in args.k.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    base_dir = base_model.resolve(args.base)
    model, tok = base_model.load(base_dir)
    results = {}
    work = Path(tempfile.mkdtemp(prefix="moerge-icl-"))
    for task in tasks:
        rows = examples(task, "test", args.n)
        pool = examples(task, "train", max(ks) + 40)
        t0 = time.perf_counter()
        zero = exact_match(model, tok, rows)
        results[(task, 0, "zero-shot")] = (zero, (time.perf_counter() - t0) / len(rows), 0.0)
        for k in ks:
            shots = pool[:k]
            acc, per = icl_scores(model, tok, shots, rows)
            results[(task, k, "icl")] = (acc, per, 0.0)
            print(f"{task} k={k} icl {acc:.0%} {per:.2f} s/example", file=sys.stderr, flush=True)
            # the adapters see exactly these k examples (repeated over the steps); the validation split of
            # a JSONL file is rows whose prompt hashes there, so the k rows are padded with validation rows
            # drawn from the task's validation split, used only for the card's score
            data = write_jsonl(work / f"{task}-{k}.jsonl", shots + examples(task, "validation", 20))
            for adapter, lr in (("ia3", 3e-2), ("lora", 2e-3)):
                t1 = time.perf_counter()
                out = work / f"{task}-{k}-{adapter}"
                train_expert(out, base=base_dir, data=data, adapter=adapter, steps=args.steps, lr=lr,
                             batch_size=min(8, k), overwrite=True, progress=False)
                train_s = time.perf_counter() - t1
                m, t = load_expert(base_dir, out)
                t2 = time.perf_counter()
                acc = exact_match(m, t, rows)
                results[(task, k, adapter)] = (acc, (time.perf_counter() - t2) / len(rows), train_s)
                print(f"{task} k={k} {adapter} {acc:.0%} (trained {train_s:.0f} s)", file=sys.stderr, flush=True)
    print(f"ICL vs PEFT on {args.base}: exact match on {args.n} test prompts per task ({', '.join(tasks)}); "
          f"adapters trained {args.steps} steps on the k examples; one run, one thread")
    print(f"{'k':>4}  {'method':<10}{'accuracy':>10}{'s/example':>11}{'train s':>9}")
    for k in [0] + ks:
        for method in (["zero-shot"] if k == 0 else ["icl", "ia3", "lora"]):
            vals = [results[(t, k, method)] for t in tasks]
            acc = sum(v[0] for v in vals) / len(vals)
            per = sum(v[1] for v in vals) / len(vals)
            tr = sum(v[2] for v in vals) / len(vals)
            print(f"{k:>4}  {method:<10}{acc:>10.1%}{per:>11.3f}{tr:>9.0f}")


if __name__ == "__main__":
    main()
