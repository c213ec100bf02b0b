"""Parity of `moerge moe` with mergekit-moe on a tiny Llama base and two fine-tunes.

    python bench/moe_parity.py [--mergekit /tmp/mk/bin/mergekit-moe]

For the deterministic gate modes (cheap_embed, hidden) it builds the same config with both tools and
reports, per mode, the max |difference| of the router rows, the expert MLPs (mergekit writes them
fused, transformers 5's layout: gate_up_proj = [w1; w3] per expert, down_proj = w2; moerge writes
Mixtral's per-expert w1/w3/w2) and the base tensors. mergekit runs the `hidden` forward pass in
bfloat16, moerge in float32: the script also reruns moerge's router arithmetic in bfloat16 to show the
remaining difference is that rounding alone.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG = """base_model: {root}/base
gate_mode: {mode}
dtype: float32
experts_per_token: 1
experts:
  - source_model: {root}/ft1
    positive_prompts: ["def f(x): return x", "import os"]
    negative_prompts: ["the cat sat on the mat"]
  - source_model: {root}/ft2
    positive_prompts: ["What is 2+2?", "Solve for x: 3x = 9"]
"""


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in glob.glob(str(folder / "*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-moe")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import moerge
    from moerge.moe.build import compute_routers
    from moerge.tiny import make_base, make_finetune

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base = make_base(root / "base", seed=0, hidden=32, layers=3, intermediate=64)
        make_finetune(base, root / "ft1", seed=1)
        make_finetune(base, root / "ft2", seed=2)
        for mode in ("cheap_embed", "hidden"):
            cfg = root / f"{mode}.yaml"
            cfg.write_text(CONFIG.format(root=root, mode=mode))
            ours, theirs = root / f"moerge-{mode}", root / f"mk-{mode}"
            moerge.merge(cfg, ours)
            subprocess.run([args.mergekit, str(cfg), str(theirs)], check=True, capture_output=True)
            a, b = load(ours), load(theirs)
            layers, n = 3, 2
            router = max((a[f"model.layers.{i}.block_sparse_moe.gate.weight"] - b[f"model.layers.{i}.mlp.gate.weight"]).abs().max().item()
                         for i in range(layers))
            expert = 0.0
            for i in range(layers):
                w1 = torch.stack([a[f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"] for e in range(n)])
                w3 = torch.stack([a[f"model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight"] for e in range(n)])
                w2 = torch.stack([a[f"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"] for e in range(n)])
                expert = max(expert, (torch.cat([w1, w3], 1) - b[f"model.layers.{i}.mlp.experts.gate_up_proj"]).abs().max().item(),
                             (w2 - b[f"model.layers.{i}.mlp.experts.down_proj"]).abs().max().item())
            shared = [k for k in a if "block_sparse_moe" not in k]
            rest = max((a[k] - b[k]).abs().max().item() for k in shared)
            line = f"{mode:12s} router max|diff| {router:.3g}   experts {expert:.3g}   base tensors {rest:.3g} ({len(shared)})"
            if mode == "hidden":
                plan = moerge.plan(cfg)
                r16 = compute_routers(plan, hidden_dtype=torch.bfloat16)
                bf = max((r16[i] - b[f"model.layers.{i}.mlp.gate.weight"]).abs().max().item() for i in range(layers))
                line += f"   (moerge's forward in bf16, as mergekit: router {bf:.3g})"
            print(line)
    sys.exit(0)


if __name__ == "__main__":
    main()
