#!/usr/bin/env python
"""Batched generation with a routed bank of LoRA experts, against the base alone and PEFT.

    python bench/routing.py [--hidden 512 --layers 8] [--experts 8] [--prompts 64] [--new-tokens 16]

A random Llama (character vocabulary; by default hidden 512, 8 layers) gets E random rank-8 LoRA experts
on every linear layer. 64 prompts each generate exactly 16 tokens, greedily, in one batch:

- base: the model alone;
- moerge: the mixture runtime with Arrow routing, top-2 experts per token and layer (routing included);
- moerge-per-example: the same runtime given each example's one expert (the work PEFT's mixed batch does);
- peft-one-at-a-time: PEFT with the 8 adapters loaded, each example generated alone after
  ``set_adapter`` to its expert (the issue's path (b));
- peft-grouped: the same, but each expert's examples generated together (one batch per adapter, the
  usual serving workaround, kinder to PEFT);
- peft-mixed: PEFT's mixed-batch path, ``generate(adapter_names=[...])``, one adapter per example;
- peft-arrow: PEFT's own Arrow (``create_arrow_model``, top-2 per token): the same routing as ours.

It also prints how many of PEFT's Arrow prototypes agree with ours (|cos| > 0.99): PEFT finds them by 15
power iterations, which do not converge when an expert's top two singular values are close, as they are
for random adapters.

Prints seconds, tokens/s and ratios. The machine is shared and noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="runs per path; the best is reported")
    args = ap.parse_args()

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from moerge.experts import load_adapter
    from moerge.io.source import open_source
    from moerge.lm.generate import encode_left_padded
    from moerge.lm.tiny import save_char_tokenizer, tiny_config
    from moerge.routing import RoutedModel
    from moerge.routing.registry import ExampleRouter, get
    from moerge.tasks import EXPERTS, mixture
    from moerge.util.progress import quiet_transformers

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="moerge-routing-bench-"))
    torch.manual_seed(0)
    cfg = tiny_config(hidden=args.hidden, layers=args.layers, heads=8, intermediate=4 * args.hidden, tie=True)
    LlamaForCausalLM(cfg).save_pretrained(work / "base")
    save_char_tokenizer(work / "base")
    tok = AutoTokenizer.from_pretrained(work / "base")
    names = [f"e{i}" for i in range(args.experts)]
    for n in names:
        m = get_peft_model(LlamaForCausalLM.from_pretrained(work / "base"),
                           LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False))
        m.save_pretrained(work / n)

    prompts = [e.prompt for e in mixture(EXPERTS, "test", args.prompts // len(EXPERTS) + 1)][: args.prompts]
    ids, mask = encode_left_padded(tok, prompts)
    assign = [i % args.experts for i in range(len(prompts))]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id, eos_token_id=None)

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            times.append(time.perf_counter() - t)
        return min(times)

    results = {}
    base = LlamaForCausalLM.from_pretrained(work / "base").eval()
    results["base"] = best(lambda: base.generate(input_ids=ids, attention_mask=mask, **gen))

    src = open_source(work / "base")
    routed = RoutedModel(LlamaForCausalLM.from_pretrained(work / "base").eval(), tok,
                         [load_adapter(work / n, src) for n in names], [{"name": n} for n in names], get("arrow")(top_k=2))
    results["moerge (arrow, top-2 per token)"] = best(lambda: routed.generate(ids, mask, **gen))

    class Assigned(ExampleRouter):
        name = "assigned"

        def example_weights(self, routed, prompts, input_ids, attention_mask):
            return torch.nn.functional.one_hot(torch.tensor(assign), args.experts).float()

    one = RoutedModel(LlamaForCausalLM.from_pretrained(work / "base").eval(), tok,
                      [load_adapter(work / n, src) for n in names], [{"name": n} for n in names], Assigned())
    results["moerge (one expert per example)"] = best(lambda: one.generate(ids, mask, **gen))

    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), work / names[0], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(work / n, adapter_name=n)
    peft.eval()

    def grouped() -> None:
        for e, n in enumerate(names):
            rows = [i for i, a in enumerate(assign) if a == e]
            if rows:
                peft.set_adapter(n)
                peft.generate(input_ids=ids[rows], attention_mask=mask[rows], **gen)

    def one_at_a_time() -> None:
        for i, a in enumerate(assign):
            peft.set_adapter(names[a])
            peft.generate(input_ids=ids[i: i + 1], attention_mask=mask[i: i + 1], **gen)

    results["peft-one-at-a-time (set_adapter)"] = best(one_at_a_time)
    results["peft-grouped (set_adapter per expert)"] = best(grouped)
    results["peft-mixed (adapter_names)"] = best(
        lambda: peft.generate(input_ids=ids, attention_mask=mask, adapter_names=[names[a] for a in assign], **gen))

    from peft import ArrowConfig, create_arrow_model

    parrow = create_arrow_model(LlamaForCausalLM.from_pretrained(work / "base"), [str(work / n) for n in names],
                                ArrowConfig(top_k=2, rng_seed=0)).eval()
    results["peft-arrow (create_arrow_model, top-2)"] = best(lambda: parrow.generate(input_ids=ids, attention_mask=mask, **gen))
    cos = torch.cat([(m.lora_arrow["arrow_router"].prototypes * routed.router.protos[name.removeprefix("base_model.model.")]).sum(-1).abs()
                     for name, m in parrow.named_modules() if hasattr(m, "lora_arrow") and "arrow_router" in m.lora_arrow])

    tokens = len(prompts) * args.new_tokens
    ours = results["moerge (arrow, top-2 per token)"]
    print(f"{len(prompts)} prompts x {args.new_tokens} new tokens, {args.experts} rank-{args.rank} LoRA experts on every "
          f"linear layer, Llama hidden {args.hidden}, {args.layers} layers, {torch.get_num_threads()} threads")
    print(f"{'path':<40} {'seconds':>8} {'tokens/s':>9} {'moerge speed-up':>16}")
    for k, s in results.items():
        print(f"{k:<40} {s:>8.2f} {tokens / s:>9.0f} {s / ours:>15.2f}x")
    print(f"moerge time / base time: {ours / results['base']:.2f}")
    print(f"PEFT's Arrow prototypes within |cos| > 0.99 of ours (exact): {int((cos > 0.99).sum())} of {len(cos)}")


if __name__ == "__main__":
    main()
