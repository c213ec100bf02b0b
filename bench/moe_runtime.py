"""The mixture runtime on an MoE base (issue 31): a forward pass of a tiny random Mixtral with moerge's
experts routed through its stacked experts and router, against the base alone and PEFT's model with one
adapter (PEFT applies a parameter LoRA by re-parametrizing the stacked weights at each forward).

    python bench/moe_runtime.py [--hidden 256] [--layers 4] [--batch 8] [--tokens 64] [--repeat 5]

Prints one table of milliseconds per forward (one torch thread; quote ratios from one run: the
machines are shared). Adapters are PEFT's own (``target_parameters``), with random B so they change
the outputs; the script checks that moerge's logits equal PEFT's for the one-adapter case first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moerge.lm.tiny import make_base, make_random_adapter
    from moerge.routing import load_routed

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(root / "mixtral", arch="mixtral", hidden=a.hidden, layers=a.layers, intermediate=2 * a.hidden)
        experts = [make_random_adapter(base, root / f"x{seed}", seed=seed, rank=8, scale=0.05) for seed in (0, 1)]
        ids = torch.randint(4, 90, (a.batch, a.tokens))
        plain = AutoModelForCausalLM.from_pretrained(base).eval()
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), experts[0]).eval()
        one = load_routed("uniform", experts=experts[:1], base=base)
        two = load_routed("uniform", experts=experts, base=base)

        def timed(f) -> float:
            f()
            start = time.perf_counter()
            for _ in range(a.repeat):
                f()
            return (time.perf_counter() - start) / a.repeat * 1e3

        with torch.no_grad():
            torch.testing.assert_close(one(ids).logits, peft(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
            rows = [("base alone", timed(lambda: plain(input_ids=ids))),
                    ("PEFT, one adapter", timed(lambda: peft(input_ids=ids))),
                    ("moerge, one expert", timed(lambda: one(ids))),
                    ("moerge, two experts mixed", timed(lambda: two(ids)))]
    print(f"mixtral hidden {a.hidden}, {a.layers} layers, 4 experts (top 2); forward of {a.batch}x{a.tokens} tokens, 1 thread")
    print("| model | ms per forward | vs base |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
