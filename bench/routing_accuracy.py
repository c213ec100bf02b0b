#!/usr/bin/env python
"""Do per-token routers send tokens to the right expert? A diagnostic for the demo's experts.

    python bench/routing_accuracy.py demo-output/experts/{reverse,sort,uppercase,shift,dedupe,novowels}
    python bench/routing_accuracy.py --base smollm2-135m-instruct --every 5 \
        DEMO/experts/{reverse_words,sort_words,caps,number_words,acronym,iso_date}

For each built-in task whose expert is given, the test prompts and their answers go through the routed
model (teacher forcing); at every adapted layer we record which expert each token's largest weight
went to. Printed per router: the share of tokens whose top expert is the task's own (all tokens, and
answer tokens only), and the share of sequences whose top expert, after averaging the scores over the
sequence, is the right one. Chance is 1/E. Routers: arrow, and phatgoose when every expert has gates.

A row follows for the experts themselves: the share of tokens on which the task's own expert's
low-rank update B_e A_e responds most strongly (largest norm of B_e A_e x) — what any router that
reads only the experts' weights builds on. The last rows are probes of what a token router could know from a layer's input, fitted with every
task's labels on the training split (which no data-free router has): the nearest class mean (cosine,
centred) of the base model's token activations, and a trained linear classifier (softmax regression on
standardised activations) — whether the task is linearly decodable from the token at all.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experts", nargs="+", type=Path, help="expert folders named after built-in tasks")
    ap.add_argument("--n", type=int, default=40, help="test prompts per task")
    ap.add_argument("--base", default=None, help="the experts' base (default: the built-in base), a folder or a name "
                    "such as smollm2-135m-instruct")
    ap.add_argument("--every", type=int, default=1, help="probe every Nth adapted layer only (the probes hold every "
                    "token's activations per layer: a real model's 210 layers need --every 5 or so)")
    args = ap.parse_args()

    from moerge.routing import load_routed
    from moerge.tasks import examples
    from moerge.util.progress import quiet_transformers

    quiet_transformers()
    tasks = [p.name for p in args.experts]
    routers = ["arrow"] + (["phatgoose"] if all((p / "gates.safetensors").is_file() for p in args.experts) else [])

    def batch(tok, task: str, split: str, n: int):
        """Prompt + answer + end of sequence, as training and evaluation render them (chat template or
        bos + text), right-padded; the answer tokens are the labelled ones."""
        from moerge.lm.batching import collate, encode

        b = collate(encode(tok, examples(task, split, n)), tok.pad_token_id)
        return b["input_ids"], b["attention_mask"].bool(), b["labels"] != -100

    print(f"{len(tasks)} experts ({', '.join(tasks)}); chance = {1 / len(tasks):.2f}")
    print(f"{'router':<28} {'tokens':>7} {'answer tokens':>14} {'sequences':>10}")
    for name in routers:
        routed = load_routed(name, experts=args.experts, base=args.base, top_k=1)
        inner = routed.router.token_weights
        scores: dict[str, torch.Tensor] = {}

        def spy(module, x, fused=None, inner=inner, scores=scores):
            w = inner(module, x, fused)
            scores[module] = w
            return w

        hits = defaultdict(list)
        for i, task in enumerate(tasks):
            ids, mask, answer = batch(routed.tokenizer, task, "test", args.n)
            routed.state.token_router = spy
            with torch.no_grad():
                routed.model(input_ids=ids, attention_mask=mask)
            routed.state.token_router = None
            for w in scores.values():
                top = w.argmax(-1)
                hits["tokens"].append((top[mask] == i).float().mean())
                hits["answer"].append((top[answer] == i).float().mean())
                seq = (w * mask[..., None]).sum(1).argmax(-1)
                hits["seq"].append((seq == i).float().mean())
        mean = {k: float(torch.stack(v).mean()) for k, v in hits.items()}
        print(f"{name + ' (top expert)':<28} {mean['tokens']:>7.2f} {mean['answer']:>14.2f} {mean['seq']:>10.2f}")

    # the probe: nearest class mean of the base's token activations at every adapted layer
    routed = load_routed("uniform", experts=args.experts, base=args.base)
    acts: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, inp, out, name=name: acts.__setitem__(name, inp[0].detach()))
             for i, (name, layer) in enumerate(routed.layers.items()) if i % args.every == 0]

    def collect(split: str, n: int):
        out = defaultdict(lambda: defaultdict(list))
        for i, task in enumerate(tasks):
            ids, mask, answer = batch(routed.tokenizer, task, split, n)
            with torch.no_grad():
                routed.model(input_ids=ids, attention_mask=mask)
            for module, x in acts.items():
                out[module]["tokens"].append((x[mask].float(), torch.full((int(mask.sum()),), i)))
                out[module]["answer"].append((x[answer].float(), torch.full((int(answer.sum()),), i)))
        return out

    train, test = collect("train", 2 * args.n), collect("test", args.n)
    response = "largest ‖B_e A_e x‖"  # which expert's low-rank update responds most to the token: what any weights-only router reads
    probes = {response: defaultdict(list), "probe (nearest class mean)": defaultdict(list), "probe (linear, trained)": defaultdict(list)}
    torch.manual_seed(0)
    for module in train:
        x = torch.cat([a for a, _ in train[module]["tokens"]])
        y = torch.cat([b for _, b in train[module]["tokens"]])
        centre, scale = x.mean(0), x.std(0).clamp(min=1e-5)
        means = torch.nn.functional.normalize(torch.stack([(x[y == k] - centre).mean(0) for k in range(len(tasks))]), dim=-1)
        linear = torch.nn.Linear(x.shape[1], len(tasks))
        opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(linear((x - centre) / scale), y).backward()
            opt.step()
        for part in ("tokens", "answer"):
            xt = torch.cat([a for a, _ in test[module][part]])
            yt = torch.cat([b for _, b in test[module][part]])
            with torch.no_grad():
                nearest = (torch.nn.functional.normalize(xt - centre, dim=-1) @ means.T).argmax(-1)
                trained = linear((xt - centre) / scale).argmax(-1)
                layer = routed.layers[module]
                strongest = torch.stack([(xt @ layer.a[e].float().T @ layer.b[e].float().T).norm(dim=-1) for e in range(len(tasks))], -1).argmax(-1)
            probes[response][part].append(float((strongest == yt).float().mean()))
            probes["probe (nearest class mean)"][part].append(float((nearest == yt).float().mean()))
            probes["probe (linear, trained)"][part].append(float((trained == yt).float().mean()))
    for h in hooks:
        h.remove()
    for name, probe in probes.items():
        print(f"{name:<28} {sum(probe['tokens']) / len(probe['tokens']):>7.2f} "
              f"{sum(probe['answer']) / len(probe['answer']):>14.2f} {'':>10}")


if __name__ == "__main__":
    from moerge.errors import MoergeError

    try:
        main()
    except MoergeError as e:  # a wrong path or name: one line, as the CLI gives it
        raise SystemExit(f"error: {e}") from None
