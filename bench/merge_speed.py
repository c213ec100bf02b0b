#!/usr/bin/env python
"""Wall time and peak RSS of moerge against mergekit on three ~271M-parameter bf16 Llama checkpoints.

    python bench/merge_speed.py --mergekit-python /path/to/venv-with-mergekit/bin/python

Builds (once, in --work) a random base and two fine-tunes shaped like a small Llama (hidden 1024,
intermediate 2816, 16 layers, vocab 32000; 518 MB each in bf16), then runs each method's recipe
through both tools as separate processes and prints a table: seconds, peak RSS, and the ratios.
Each process is timed whole (imports included), as a user would run it. mergekit is optional: without
it only moerge's column is printed. This machine is shared and noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHAPE = dict(hidden=1024, intermediate=2816, layers=16, vocab=32000, heads=16)

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.4}}\n"
              "  - model: {ft1}\n    parameters: {{weight: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.3}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\nparameters:\n  t: 0.5\n",
}


def build_models(work: Path) -> dict[str, Path]:
    """A base and two fine-tunes, written with safetensors; reused if already there."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {k: work / k for k in ("base", "ft1", "ft2")}
    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"], num_hidden_layers=SHAPE["layers"],
                      num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["heads"], vocab_size=SHAPE["vocab"],
                      tie_word_embeddings=False, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    if all((p / "model.safetensors").exists() for p in paths.values()):
        for p in paths.values():
            cfg.save_pretrained(p)
        return paths
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for name, sd in (("base", base),
                     ("ft1", {k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16) for k, v in base.items()}),
                     ("ft2", {k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16) for k, v in base.items()})):
        p = paths[name]
        p.mkdir(parents=True, exist_ok=True)
        save_file(sd, p / "model.safetensors", metadata={"format": "pt"})
        cfg.save_pretrained(p)
        del sd
    return paths


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command, via GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", f.name] + cmd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        wall, rss_kb = f.read().split()[-2:]
    return float(wall), int(rss_kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moerge-bench")
    ap.add_argument("--mergekit-python", help="a python that has mergekit installed (its own venv)")
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the best is reported")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    paths = build_models(args.work)
    # both tools should find the inputs in the page cache: otherwise whichever runs first pays the disk
    for p in paths.values():
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for method in args.methods.split(","):
        recipe = args.work / f"{method}.yaml"
        recipe.write_text(RECIPES[method].format(**{k: str(v) for k, v in paths.items()}))
        out = args.work / "out"
        result = {"method": method}
        tools = {"moerge": [sys.executable, "-m", "moerge.cli", "merge", str(recipe), str(out), "--overwrite", "-q"]}
        if args.mergekit_python:
            mk = str(Path(args.mergekit_python).parent / "mergekit-yaml")
            tools["mergekit"] = [mk, str(recipe), str(out), "--no-copy-tokenizer", "--quiet", "--no-write-model-card"]
        for tool, cmd in tools.items():
            best = None
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                wall, rss = timed(cmd, env)
                best = (wall, rss) if best is None or wall < best[0] else best
            result[tool] = {"seconds": best[0], "peak_rss_mb": best[1]}
        shutil.rmtree(out, ignore_errors=True)
        rows.append(result)
        print(json.dumps(result), file=sys.stderr)

    head = f"{'method':<16} {'moerge s':>9} {'RSS MB':>8}"
    if args.mergekit_python:
        head += f" {'mergekit s':>11} {'RSS MB':>8} {'time ratio':>10} {'RSS ratio':>9}"
    print(head)
    for r in rows:
        line = f"{r['method']:<16} {r['moerge']['seconds']:>9.2f} {r['moerge']['peak_rss_mb']:>8.0f}"
        if "mergekit" in r:
            m, k = r["moerge"], r["mergekit"]
            line += (f" {k['seconds']:>11.2f} {k['peak_rss_mb']:>8.0f} {m['seconds'] / k['seconds']:>10.2f}"
                     f" {m['peak_rss_mb'] / k['peak_rss_mb']:>9.2f}")
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
