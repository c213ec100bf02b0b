#!/usr/bin/env python
"""Speculative decoding in the serving engine (``moerge serve --draft``): tokens/s with and without a draft.

    python bench/speculative.py [--base smollm2-135m-instruct] [--draft-layers 8 | --draft DIR]
                                [--k 4] [--batches 1,8] [--prompts 16] [--new-tokens 48]

The served model is the base (by default the real one, after ``moerge base get``). The draft is
another model with its vocabulary: by default the base's first N layers (``--draft-layers``), cut out
by a passthrough merge through moerge's own engine, untrained, a LayerSkip-style early exit. Prompts
are the real suite's test prompts through the chat template; generation is greedy, so the texts must
be identical with and without the draft (checked). For each batch size B the engine is given B
requests at a time until all prompts are answered; the table gives tokens/s, the share of proposed
tokens the model accepted, and the speed-up. One torch thread. The machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path


def run(engine, prompts, batch: int, new_tokens: int) -> tuple[list[str], float, int]:
    from moerge.serve.bank import Route
    from moerge.serve.engine import Sampling, Sequence

    texts, tokens, start = [], 0, time.perf_counter()
    for s in range(0, len(prompts), batch):
        group, done = [], []
        for ids, text in prompts[s: s + batch]:
            ev = threading.Event()
            seq = Sequence(prompt_ids=ids, prompt_text=text, route=Route(), sampling=Sampling(max_tokens=new_tokens, temperature=0),
                           emit=lambda e, ev=ev: ev.set() if e[0] in ("done", "error") else None)
            group.append(seq)
            done.append(ev)
            engine.submit(seq)
        for ev in done:
            ev.wait()
        texts += [q.text for q in group]
        tokens += sum(len(q.out_ids) for q in group)
    return texts, time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default=None, help="a draft model folder (default: the base's first --draft-layers layers)")
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--k", type=int, default=4, help="tokens proposed per step")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()

    import torch

    import moerge
    from moerge import base as base_model
    from moerge.serve import load_draft
    from moerge.serve.bank import open_bank
    from moerge.serve.engine import Engine
    from moerge.tasks import mixture
    from moerge.tasks.chat import chat_ids
    from moerge.tasks.skills import REAL_EXPERTS
    from moerge.util import quiet_transformers

    torch.set_num_threads(1)
    quiet_transformers()
    base_dir = base_model.resolve(args.base)
    draft = args.draft
    if draft is None:
        draft = Path(tempfile.mkdtemp(prefix="moerge-draft-")) / "draft"
        moerge.merge({"merge_method": "passthrough", "dtype": "float32",
                      "slices": [{"sources": [{"model": str(base_dir), "layer_range": [0, args.draft_layers]}]}]},
                     draft, progress=False)
    bank = open_bank(base=str(base_dir), routers=[])
    tok = bank.tokenizer
    rows = mixture(list(REAL_EXPERTS), "test", args.prompts // len(REAL_EXPERTS) + 1)[: args.prompts]
    prompts = [chat_ids(tok, [{"role": "user", "content": r.prompt}]) for r in rows]
    plain = Engine(bank, max_batch=64)
    spec = Engine(bank, max_batch=64, draft=load_draft(str(draft), bank), draft_tokens=args.k)
    layers = bank.model.config.num_hidden_layers
    print(f"served: {base_dir.name} ({layers} layers); draft: {draft if args.draft else f'its first {args.draft_layers} layers'}; "
          f"k = {args.k}; {len(prompts)} prompts, up to {args.new_tokens} tokens each, greedy", flush=True)
    print("| batch | plain tokens/s | with draft tokens/s | accepted | speed-up | same text |")
    print("|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batches.split(",")]:
        run(plain, prompts[:2], b, 4)  # warm-up
        want, t_plain, n = run(plain, prompts, b, args.new_tokens)
        before = dict(spec.stats)
        got, t_spec, m = run(spec, prompts, b, args.new_tokens)
        acc = (spec.stats["accepted"] - before["accepted"]) / max(1, spec.stats["proposed"] - before["proposed"])
        print(f"| {b} | {n / t_plain:.1f} | {m / t_spec:.1f} | {acc:.0%} | {t_plain / t_spec * m / n:.2f}x | "
              f"{'yes' if got == want else f'NO ({sum(a != c for a, c in zip(got, want))} differ)'} |", flush=True)
    plain.close()
    spec.close()


if __name__ == "__main__":
    main()
