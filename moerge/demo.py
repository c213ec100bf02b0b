"""``moerge demo``: the main job on built-in data, offline.

Until the embedded skill suite exists, the demo builds a tiny random Llama base and three synthetic
fine-tunes of it, merges them through the real engine with the main methods, reloads each merge with
transformers and generates from it, and reports how much of each fine-tune's task vector survives
in the merge (cosine of the merged delta with each fine-tune's delta, over all weights).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

RECIPES = {
    "linear": {"parameters": {"weight": 1.0}},
    "task_arithmetic": {"parameters": {"weight": 0.5}},
    "ties": {"parameters": {"weight": 0.5, "density": 0.3}},
    "dare_ties": {"parameters": {"weight": 0.5, "density": 0.3}},
    "breadcrumbs_ties": {"parameters": {"weight": 0.5, "density": 0.3, "gamma": 0.01}},
    "model_stock": {},
}


def _deltas(folder: Path, base: dict[str, torch.Tensor]) -> torch.Tensor:
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    return torch.cat([(sd[k].float() - base[k].float()).reshape(-1) for k in sorted(base)])


def run_demo(out_dir: Path, quick: bool = False, console: Console | None = None) -> list[dict]:
    import moerge
    from moerge.tiny import make_base, make_finetune

    console = console or Console()
    out_dir = Path(out_dir)
    work = out_dir / "models"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    size = dict(hidden=32, layers=2, intermediate=64) if quick else dict(hidden=128, layers=4, intermediate=344)
    base = make_base(work / "base", seed=0, **size)
    experts = [make_finetune(base, work / f"expert{i}", seed=i, scale=0.05) for i in (1, 2, 3)]
    from safetensors.torch import load_file

    base_sd = load_file(base / "model.safetensors")
    expert_deltas = [_deltas(e, base_sd) for e in experts]

    rows = []
    for method, extra in RECIPES.items():
        recipe = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(e), **({"parameters": extra["parameters"]} if "parameters" in extra else {})} for e in experts],
        }
        if method == "linear":
            recipe["models"].append({"model": str(base), "parameters": {"weight": 1.0}})
        start = time.perf_counter()
        res = moerge.merge(recipe, out_dir / f"merge-{method}", overwrite=True)
        seconds = time.perf_counter() - start
        merged = _deltas(res.out_dir, base_sd)
        cos = [float(torch.nn.functional.cosine_similarity(merged, d, dim=0)) for d in expert_deltas]
        rows.append({"method": method, "seconds": seconds, "cosine": cos, "text": _generate(res.out_dir)})

    table = Table(title="moerge demo: 3 synthetic fine-tunes of a tiny Llama, merged")
    table.add_column("method")
    for i in range(len(experts)):
        table.add_column(f"cos(merge, expert{i + 1})", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("generates")
    for r in rows:
        table.add_row(r["method"], *[f"{c:.3f}" for c in r["cosine"]], f"{r['seconds']:.2f}", repr(r["text"]))
    console.print(table)
    console.print(f"merged models are in {out_dir}/merge-*; each loads with AutoModelForCausalLM.from_pretrained")
    return rows


def _generate(folder: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok("abc", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
