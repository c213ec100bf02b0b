#!/usr/bin/env python
"""Do moerge and mergekit produce the same tensors from the same recipe?

    python bench/parity.py --mergekit-python /path/to/venv-with-mergekit/bin/python

Installs nothing: mergekit runs from the python you name (its own venv), moerge from this one. Builds a
small random float32 Llama base and three fine-tunes (in --work), runs every recipe below through
both tools, and prints per recipe the largest absolute difference over all output tensors.
Deterministic methods must agree to float rounding. Random ones (DARE, DELLA) draw different random
masks in each tool, so their rows compare distributions instead: the fraction of entries that
differ from the base, and the norm of the merged task vector, per tensor, as a relative difference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=320)

M3 = "  - model: {ft1}\n    parameters: {p1}\n  - model: {ft2}\n    parameters: {p2}\n  - model: {ft3}\n    parameters: {p3}\n"


def _tv(method: str, p1: str, p2: str, p3: str, extra: str = "") -> str:
    return (f"merge_method: {method}\nbase_model: {{base}}\ndtype: float32\n{extra}models:\n"
            + M3.format(ft1="{ft1}", ft2="{ft2}", ft3="{ft3}", p1=p1, p2=p2, p3=p3))


# name -> (recipe, random?)
RECIPES: dict[str, tuple[str, bool]] = {
    "linear": ("merge_method: linear\ndtype: float32\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.4}}\n"
               + M3.format(ft1="{ft1}", ft2="{ft2}", ft3="{ft3}", p1="{{weight: 0.3}}", p2="{{weight: 0.2}}", p3="{{weight: 0.1}}"), False),
    "linear (gradient, filter)": (
        "merge_method: linear\ndtype: float32\nmodels:\n  - model: {ft1}\n    parameters:\n      weight:\n"
        "        - filter: self_attn\n          value: [0.1, 0.9]\n        - value: 0.5\n  - model: {ft2}\n"
        "    parameters: {{weight: 0.5}}\n", False),
    "task_arithmetic": (_tv("task_arithmetic", "{{weight: 0.5}}", "{{weight: 0.3}}", "{{weight: 0.4}}", "parameters: {{lambda: 0.8}}\n"), False),
    "ties": (_tv("ties", "{{weight: 0.5, density: 0.5}}", "{{weight: 0.3, density: 0.7}}", "{{weight: 0.4, density: 0.3}}"), False),
    "ties (gradient density)": (_tv("ties", "{{weight: 0.5, density: [0.2, 0.8]}}", "{{weight: 0.3, density: 0.7}}", "{{weight: 0.4, density: 0.3}}"), False),
    "breadcrumbs": (_tv("breadcrumbs", "{{weight: 0.5, density: 0.8, gamma: 0.05}}", "{{weight: 0.3, density: 0.7, gamma: 0.02}}", "{{weight: 0.4, density: 0.9, gamma: 0.01}}"), False),
    "breadcrumbs_ties": (_tv("breadcrumbs_ties", "{{weight: 0.5, density: 0.8, gamma: 0.05}}", "{{weight: 0.3, density: 0.7, gamma: 0.02}}", "{{weight: 0.4, density: 0.9, gamma: 0.01}}"), False),
    "model_stock": ("merge_method: model_stock\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {ft3}\n", False),
    "slerp": ("merge_method: slerp\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {base}\n  - model: {ft1}\n"
              "parameters:\n  t:\n    - filter: mlp\n      value: [0.2, 0.8]\n    - value: 0.4\n", False),
    "nuslerp": ("merge_method: nuslerp\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.3}}\n"
                "  - model: {ft2}\n    parameters: {{weight: 0.7}}\n", False),
    "multislerp": ("merge_method: multislerp\ndtype: float32\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.3}}\n"
                   "  - model: {ft2}\n    parameters: {{weight: 0.5}}\n  - model: {ft3}\n    parameters: {{weight: 0.2}}\n", False),
    "karcher": ("merge_method: karcher\ndtype: float32\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {ft3}\n", False),
    "karcher (base_model not listed)": ("merge_method: karcher\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {ft1}\n"
                                       "  - model: {ft2}\n", False),
    "linear (base_model not listed)": ("merge_method: linear\nbase_model: {base}\ndtype: float32\nparameters: {{weight: 0.2}}\n"
                                      "models:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n  - model: {ft2}\n"
                                      "    parameters: {{weight: 0.3}}\n", False),
    "slerp with an unused weight": ("merge_method: slerp\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {base}\n"
                                    "    parameters: {{weight: 0.5}}\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
                                    "parameters: {{t: 0.3}}\n", False),
    "sce": ("merge_method: sce\nbase_model: {base}\ndtype: float32\nparameters: {{select_topk: 0.5}}\nmodels:\n  - model: {ft1}\n"
           "  - model: {ft2}\n  - model: {ft3}\n", False),
    "sce (all positions)": ("merge_method: sce\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {ft1}\n"
                           "  - model: {ft2}\n  - model: {ft3}\n", False),
    "nearswap": ("merge_method: nearswap\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {base}\n  - model: {ft1}\n"
                 "parameters:\n  t:\n    - filter: mlp\n      value: [0.002, 0.02]\n    - value: 0.008\n", False),
    "ram": ("merge_method: ram\nbase_model: {base}\ndtype: float32\nparameters: {{epsilon: 0.008}}\nmodels:\n  - model: {ft1}\n"
           "  - model: {ft2}\n  - model: {ft3}\n", False),
    "ram (default epsilon)": ("merge_method: ram\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {ft1}\n"
                             "  - model: {ft2}\n  - model: {ft3}\n", False),
    "ramplus_tl": ("merge_method: ramplus_tl\nbase_model: {base}\ndtype: float32\nparameters: {{r: 0.5, alpha: 0.5, epsilon: 0.015}}\n"
                   "models:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {ft3}\n", False),
    "ramplus_tl (defaults)": ("merge_method: ramplus_tl\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {ft1}\n"
                             "  - model: {ft2}\n  - model: {ft3}\n", False),
    "arcee_fusion": ("merge_method: arcee_fusion\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {base}\n  - model: {ft1}\n", False),
    "passthrough (slices)": (
        "merge_method: passthrough\ndtype: float32\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 3]\n"
        "  - sources:\n      - model: {ft2}\n        layer_range: [1, 4]\n", False),
    "dare_ties": (_tv("dare_ties", "{{weight: 0.5, density: 0.5}}", "{{weight: 0.3, density: 0.7}}", "{{weight: 0.4, density: 0.3}}"), True),
    "dare_linear": (_tv("dare_linear", "{{weight: 0.5, density: 0.5}}", "{{weight: 0.3, density: 0.7}}", "{{weight: 0.4, density: 0.3}}"), True),
    "della": (_tv("della", "{{weight: 0.5, density: 0.5, epsilon: 0.1}}", "{{weight: 0.3, density: 0.7, epsilon: 0.2}}", "{{weight: 0.4, density: 0.4, epsilon: 0.1}}"), True),
    "della_linear": (_tv("della_linear", "{{weight: 0.5, density: 0.5, epsilon: 0.1}}", "{{weight: 0.3, density: 0.7, epsilon: 0.2}}", "{{weight: 0.4, density: 0.4, epsilon: 0.1}}"), True),
    # vocabularies that differ (va: base + chat markers; vb: two ids swapped + a tool marker): rows aligned by token
    "tokenizer_source: base": ("merge_method: task_arithmetic\nbase_model: {vbase}\ntokenizer_source: base\ndtype: float32\n"
                               "models:\n  - model: {va}\n    parameters: {{weight: 0.6}}\n  - model: {vb}\n    parameters: {{weight: 0.4}}\n", False),
    "tokenizer_source: union": ("merge_method: task_arithmetic\nbase_model: {vbase}\ntokenizer_source: union\ndtype: float32\n"
                                "models:\n  - model: {va}\n    parameters: {{weight: 0.6}}\n  - model: {vb}\n    parameters: {{weight: 0.4}}\n", False),
    "tokenizer_source: a model": ("merge_method: linear\ntokenizer_source: {vb}\ndtype: float32\nmodels:\n  - model: {va}\n"
                                  "    parameters: {{weight: 0.5}}\n  - model: {vbase}\n    parameters: {{weight: 0.2}}\n"
                                  "  - model: {vb}\n    parameters: {{weight: 0.3}}\n", False),
    "tokenizer: block": (
        "merge_method: ties\nbase_model: {vbase}\ndtype: float32\ntokenizer:\n  source: union\n  pad_to_multiple_of: 8\n"
        "  tokens:\n    <|im_start|>:\n      source: {{kind: zero}}\n      force: true\n    <|im_end|>:\n"
        "      source: {{kind: model_token, model: {vb}, token: </s>}}\n    a:\n      source: {vb}\n      force: true\n"
        "models:\n  - model: {va}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {vb}\n"
        "    parameters: {{weight: 0.4, density: 0.7}}\n", False),
}


def build_vocab_models(work: Path) -> dict[str, Path]:
    """Three tiny Llamas whose vocabularies differ in a few tokens (moerge.lm.tiny.make_vocab_model)."""
    from moerge.lm.tiny import CHARS, SPECIALS, make_vocab_model

    base = SPECIALS + CHARS[:30]
    vocabs = {"vbase": base, "va": base + ["<|im_start|>", "<|im_end|>"],
              "vb": base[:10] + [base[11], base[10]] + base[12:] + ["<|tool|>"]}
    return {k: make_vocab_model(work / k, v, seed=10 * i, hidden=16, layers=2) for i, (k, v) in enumerate(vocabs.items())}


def build_models(work: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPE, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).state_dict()
    paths = {}
    for name in ("base", "ft1", "ft2", "ft3"):
        sd = base if name == "base" else {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
        path = work / name
        path.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path / "model.safetensors", metadata={"format": "pt"})
        cfg.save_pretrained(path)
        paths[name] = path
    return paths


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def by_token(tensors: dict, folder: Path, like: Path) -> dict:
    """``tensors`` (saved with ``folder``'s tokenizer) with vocabulary rows reordered to ``like``'s token ids."""
    from transformers import AutoTokenizer

    theirs, ours = AutoTokenizer.from_pretrained(folder).get_vocab(), AutoTokenizer.from_pretrained(like).get_vocab()
    if set(theirs) != set(ours):
        return tensors  # different vocabularies: compare() reports the mismatch
    order = torch.tensor([theirs[t] for t, _ in sorted(ours.items(), key=lambda x: x[1])])
    out = {}
    for k, t in tensors.items():
        if t.dim() == 2 and t.shape[0] >= len(order) and ("embed" in k or "lm_head" in k):
            t = torch.cat([t[order], t[len(order):]])
        out[k] = t
    return out


def compare(a: dict, b: dict, base: dict | None, random: bool) -> tuple[str, str, bool]:
    if set(a) != set(b):
        return "tensor names differ", f"{sorted(set(a) ^ set(b))[:3]}", False
    if not random:
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        scale = max(float(b[k].abs().max()) for k in b)
        return f"{diff:.2e}", f"{diff / scale:.1e}", diff <= 1e-5 * max(1.0, scale)
    # over the matrices (a 64-entry norm vector is too small to estimate a kept fraction from)
    kept = {"a": 0.0, "b": 0.0}
    sq = {"a": 0.0, "b": 0.0}
    total = 0
    for k in a:
        if k not in base or a[k].dim() < 2:
            continue
        for tag, out in (("a", a[k]), ("b", b[k])):
            d = out.double() - base[k].double()
            kept[tag] += float((d != 0).double().sum())
            sq[tag] += float(d.square().sum())
        total += a[k].numel()
    frac_gap = abs(kept["a"] - kept["b"]) / total
    norm_gap = abs(sq["a"] ** 0.5 - sq["b"] ** 0.5) / sq["b"] ** 0.5
    return f"kept Δ {frac_gap:.4f}", f"norm Δ {norm_gap:.2%}", frac_gap < 0.005 and norm_gap < 0.01


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-python", required=True, help="a python that has mergekit installed (its own venv)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moerge-parity")
    ap.add_argument("--only", help="comma-separated recipe names")
    args = ap.parse_args()

    mergekit_yaml = Path(args.mergekit_python).parent / "mergekit-yaml"
    if not mergekit_yaml.exists():
        sys.exit(f"error: {mergekit_yaml} not found; pass the python of a venv where `pip install mergekit` was run")
    shutil.rmtree(args.work, ignore_errors=True)
    paths = build_models(args.work) | build_vocab_models(args.work)
    base = load_folder(paths["base"])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    names = args.only.split(",") if args.only else list(RECIPES)
    print(f"{'recipe':<28} {'max |diff|':>14} {'relative':>14}  agree")
    failed = 0
    for name in names:
        recipe, random = RECIPES[name]
        path = args.work / "recipe.yaml"
        path.write_text(recipe.format(**{k: str(v) for k, v in paths.items()}))
        outs = {}
        for tool, cmd in (
            ("moerge", [sys.executable, "-m", "moerge.cli", "merge", str(path), str(args.work / "out-moerge"), "--overwrite", "-q"]),
            ("mergekit", [str(mergekit_yaml), str(path), str(args.work / "out-mergekit"), "--quiet", "--no-copy-tokenizer", "--allow-crimes"]),
        ):
            shutil.rmtree(args.work / f"out-{tool}", ignore_errors=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"error: {tool} failed on {name}:\n{proc.stderr[-1500:]}")
            outs[tool] = load_folder(args.work / f"out-{tool}")
        if name.startswith("tokenizer"):  # mergekit orders a union's new tokens by a Python set: compare by token
            outs["mergekit"] = by_token(outs["mergekit"], args.work / "out-mergekit", args.work / "out-moerge")
        d, r, ok = compare(outs["moerge"], outs["mergekit"], base, random)
        failed += not ok
        print(f"{name + (' (random)' if random else ''):<28} {d:>14} {r:>14}  {'yes' if ok else 'NO'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
