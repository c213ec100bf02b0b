#!/usr/bin/env python
"""Speculative decoding in the serving engine (``moerge serve --draft``): tokens/s with and without it.

    python bench/speculative.py [--base smollm2-135m-instruct] [--target base|upscale:A,B]
                                [--drafts ngram,layers:8,base,DIR] [--expert-dirs D1,D2,...]
                                [--k 4] [--batches 1,8] [--prompts 16] [--new-tokens 48]

The served model (``--target``) is the base (by default the real one, after ``moerge base get``), or a
deeper model built from it by depth up-scaling (``upscale:A,B``: its layers [0, A) then [B, L), a
passthrough merge through moerge's own engine, as SOLAR's DUS does before its continued pretraining),
for which the base itself is the natural draft. With ``--expert-dirs`` (trained experts named after
their skills, e.g. the real demo's) each prompt is served by its skill's expert, as a routed server
would. Each draft in ``--drafts`` is tried in turn:

- ``ngram``: prompt lookup, no model: the tokens that followed the latest earlier occurrence of the
  row's last 3 (2, 1) tokens in its prompt and answer;
- ``layers:N``: the base's first N layers, untrained (a LayerSkip-style early exit without its training);
- ``base``: the base model (for an up-scaled target);
- a folder: any model with the base's vocabulary.

Prompts are the real suite's test prompts through the chat template; generation is greedy, so the
texts must be identical with and without speculation (checked). For each batch size B the engine gets B
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
        for ids, text, expert in prompts[s: s + batch]:
            ev = threading.Event()
            seq = Sequence(prompt_ids=ids, prompt_text=text, route=Route(weights={expert: 1.0} if expert else {}),
                           sampling=Sampling(max_tokens=new_tokens, temperature=0),
                           emit=lambda e, ev=ev: ev.set() if e[0] in ("done", "error") else None)
            group.append(seq)
            done.append(ev)
            engine.submit(seq)
        for ev in done:
            ev.wait()
        texts += [q.text for q in group]
        tokens += sum(len(q.out_ids) for q in group)
    return texts, time.perf_counter() - start, tokens


def passthrough(base_dir: Path, ranges: list[tuple[int, int]], out: Path) -> Path:
    import moerge

    moerge.merge({"merge_method": "passthrough", "dtype": "bfloat16",
                  "slices": [{"sources": [{"model": str(base_dir), "layer_range": list(r)}]} for r in ranges]},
                 out, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--target", default="base", help="base, or upscale:A,B (layers [0,A) then [B,L) of the base)")
    ap.add_argument("--drafts", default="ngram,layers:8", help="ngram, layers:N, base, or folders (comma-separated)")
    ap.add_argument("--expert-dirs", default=None, help="trained experts named after their skills: each prompt is "
                    "served by its skill's expert")
    ap.add_argument("--k", type=int, default=4, help="tokens proposed per step")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()

    import torch

    from moerge.lm import base as base_model
    from moerge.lm.chat import chat_ids
    from moerge.serve import load_draft
    from moerge.serve.bank import open_bank
    from moerge.serve.engine import Engine
    from moerge.tasks import mixture
    from moerge.tasks.skills import REAL_EXPERTS
    from moerge.util.progress import quiet_transformers

    torch.set_num_threads(1)
    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="moerge-spec-"))
    base_dir = base_model.resolve(args.base)
    base_model.check_model_folder(base_dir, "--base")
    layers = int(__import__("json").loads((base_dir / "config.json").read_text())["num_hidden_layers"])
    target = base_dir
    if args.target.startswith("upscale:"):
        a, b = (int(x) for x in args.target.partition(":")[2].split(","))
        target = passthrough(base_dir, [(0, a), (b, layers)], work / "target")
    experts = [d for d in (args.expert_dirs or "").split(",") if d]
    bank = open_bank(experts=experts or None, base=str(target), routers=[])
    tok = bank.tokenizer
    skills = [Path(d).name for d in experts] or list(REAL_EXPERTS)
    rows = mixture(skills, "test", args.prompts // len(skills) + 1)[: args.prompts]
    prompts = [(*chat_ids(tok, [{"role": "user", "content": r.prompt}]), r.task if experts else None) for r in rows]
    plain = Engine(bank, max_batch=64, prefix_cache=0)
    served = bank.model.config.num_hidden_layers
    print(f"served: {target.name} ({served} layers){' with ' + str(len(experts)) + ' experts, each prompt its own' if experts else ''}; "
          f"k = {args.k}; {len(prompts)} prompts, up to {args.new_tokens} tokens each, greedy", flush=True)
    print("| draft | batch | plain tokens/s | speculative tokens/s | accepted | speed-up | same text |")
    print("|---|---|---|---|---|---|---|")
    for name in args.drafts.split(","):
        if name == "ngram":
            draft = "ngram"
        elif name.startswith("layers:"):
            draft = load_draft(str(passthrough(base_dir, [(0, int(name.partition(":")[2]))], work / name.replace(":", "-"))), bank)
        else:
            draft = load_draft(str(base_dir) if name == "base" else name, bank)
        spec = Engine(bank, max_batch=64, draft=draft, draft_tokens=args.k, prefix_cache=0)
        for b in [int(x) for x in args.batches.split(",")]:
            run(plain, prompts[:2], b, 4)  # warm-up
            want, t_plain, n = run(plain, prompts, b, args.new_tokens)
            before = dict(spec.stats)
            got, t_spec, m = run(spec, prompts, b, args.new_tokens)
            acc = (spec.stats["accepted"] - before["accepted"]) / max(1, spec.stats["proposed"] - before["proposed"])
            print(f"| {name} | {b} | {n / t_plain:.1f} | {m / t_spec:.1f} | {acc:.0%} | {t_plain / t_spec * m / n:.2f}x | "
                  f"{'yes' if got == want else f'NO ({sum(a != c for a, c in zip(got, want))} differ)'} |", flush=True)
        spec.close()
    plain.close()


if __name__ == "__main__":
    from moerge.errors import MoergeError

    try:
        main()
    except MoergeError as e:  # a wrong path or name: one line, as the CLI gives it
        raise SystemExit(f"error: {e}") from None
