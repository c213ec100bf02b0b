"""Parity of `moerge merge` on mergekit-moe configs with mergekit-moe, on tiny models, for every output
architecture (Mixtral, DeepSeek MoE, Qwen MoE with a gated shared expert, Qwen3 MoE) and the
deterministic gate modes (cheap_embed, hidden).

    python bench/moe_parity.py [--mergekit /tmp/mk/bin/mergekit-moe]

Both outputs are brought to one layout before comparing: transformers 5's fused experts
(``mlp.experts.gate_up_proj`` = per expert [gate; up], ``mlp.experts.down_proj``), which is what
mergekit writes for Mixtral and Qwen3 MoE (moerge writes Mixtral's per-expert w1/w3/w2 and fuses only
Qwen3 MoE; transformers reads both). Per config it prints the architecture each tool chose, whether
the tensor names agree, and the max |difference| of the routers, the expert MLPs and the other
tensors. mergekit runs the `hidden` forward pass in bfloat16 always, moerge in the base's precision (bf16
for a half-precision base, float32 for a float32 one): for hidden configs the script also reruns
moerge's router arithmetic in bfloat16, to show the remaining difference on float32 bases is that
rounding alone.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

EXPERTS = """experts:
  - source_model: {root}/{arch}-ft1
    positive_prompts: ["def f(x): return x", "import os"]
    negative_prompts: ["the cat sat on the mat"]
  - source_model: {root}/{arch}-ft2
    positive_prompts: ["What is 2+2?", "Solve for x: 3x = 9"]
"""
HEAD = "base_model: {root}/{arch}-base\ngate_mode: {mode}\ndtype: float32\nexperts_per_token: 1\n"
# the shared expert is the base: mergekit-moe 0.1.5 crashes ('NoneType' object has no attribute
# 'get_tensor') when the shared expert is a model that is neither the base nor a routed expert
SHARED_GATED = """shared_experts:
  - source_model: {root}/{arch}-base
    positive_prompts: ["Once upon a time"]
    residual_scale: 0.1
"""
SHARED_PLAIN = """shared_experts:
  - source_model: {root}/{arch}-base
    residual_scale: 0.5
"""
CASES = [  # (label, input arch, extra YAML)
    ("mixtral", "llama", ""),
    ("qwen-moe", "llama", SHARED_GATED),
    ("qwen-moe", "qwen2", SHARED_GATED),
    ("deepseek", "llama", SHARED_PLAIN),
    ("qwen3-moe", "qwen3", ""),
    ("mixtral", "llama-bf16", ""),  # a bfloat16 base: moerge runs `hidden` in bf16 too, as mergekit does
]
EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in glob.glob(str(folder / "*.safetensors")):
        out.update(load_file(f))
    return out


def canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert MLP tensors fused as transformers 5 holds them; Mixtral's gate renamed to mlp.gate."""
    out, parts = {}, {}
    for k, v in sd.items():
        m = EXPERT.match(k)
        if m:
            parts.setdefault(int(m[1]), {}).setdefault(PART[m[3]], {})[int(m[2])] = v
        else:
            out[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = v
    for layer, p in parts.items():
        n = len(p["gate"])
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([p["gate"][e], p["up"][e]]) for e in range(n)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([p["down"][e] for e in range(n)])
    return out


def kind(name: str) -> str:
    if name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
        return "router"
    return "experts" if ".mlp." in name else "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-moe")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import moerge
    from moerge.lm.tiny import make_base, make_finetune
    from moerge.moe.build import compute_routers

    print(f"{'config':28s} {'moerge arch':14s} {'mergekit arch':14s} names  router    experts   other     (router, moerge in bf16)")
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for arch in sorted({a for _, a, _ in CASES}):
            dtype = torch.bfloat16 if arch.endswith("-bf16") else torch.float32
            base = make_base(root / f"{arch}-base", seed=0, hidden=32, layers=3, intermediate=64,
                             arch=arch.removesuffix("-bf16"), dtype=dtype)
            for s in (1, 2):
                make_finetune(base, root / f"{arch}-ft{s}", seed=s)
        for label, arch, extra in CASES:
            for mode in ("cheap_embed", "hidden"):
                name = f"{label}/{arch}/{mode}"
                cfg = root / f"{label}-{arch}-{mode}.yaml"
                cfg.write_text((HEAD + EXPERTS + extra).format(root=root, arch=arch, mode=mode))
                ours, theirs = root / f"moerge-{label}-{arch}-{mode}", root / f"mk-{label}-{arch}-{mode}"
                plan = moerge.plan(cfg)
                moerge.merge(cfg, ours)
                run = subprocess.run([args.mergekit, str(cfg), str(theirs)], capture_output=True, text=True)
                if run.returncode:
                    print(f"{name:28s} {plan.arch.name:14s} mergekit failed: {run.stderr.strip().splitlines()[-1][:80]}")
                    continue
                mk_arch = json.loads((theirs / "config.json").read_text())["architectures"][0]
                a, b = canonical(load(ours)), canonical(load(theirs))
                same = set(a) == set(b)
                diff = {"router": 0.0, "experts": 0.0, "other": 0.0}
                for k in set(a) & set(b):
                    diff[kind(k)] = max(diff[kind(k)], (a[k].float() - b[k].float()).abs().max().item())
                worst = max(worst, diff["experts"], diff["other"], diff["router"] if mode == "cheap_embed" else 0.0)
                line = (f"{name:28s} {plan.arch.name:14s} {mk_arch.removesuffix('ForCausalLM'):14s} "
                        f"{'same ' if same else 'DIFF '}  {diff['router']:<9.3g} {diff['experts']:<9.3g} {diff['other']:<9.3g}")
                if not same:
                    line += f" only moerge: {sorted(set(a) - set(b))[:2]} only mergekit: {sorted(set(b) - set(a))[:2]}"
                if mode == "hidden":
                    r16 = compute_routers(plan, hidden_dtype=torch.bfloat16)
                    n = len(plan.config.experts)
                    bf = 0.0
                    for i in range(plan.num_layers):
                        bf = max(bf, (r16[i, :n] - b[f"model.layers.{i}.mlp.gate.weight"]).abs().max().item())
                        g = f"model.layers.{i}.mlp.shared_expert_gate.weight"
                        if g in b:
                            bf = max(bf, (r16[i, n:] - b[g]).abs().max().item())
                    line += f" ({bf:.3g})"
                print(line, flush=True)
    print(f"max |diff| outside the bf16 hidden routers: {worst:.3g}")
    sys.exit(0)


if __name__ == "__main__":
    main()
