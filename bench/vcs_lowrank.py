"""A commit whose checkpoint changed by a LoRA: what `moerge git add --lora` stores, against a plain
`git add` of the same file (dense objects), and what checking it out costs.

    python bench/vcs_lowrank.py [--size-mb 256] [--rank 16] [--dtype bf16|f32]

Builds a synthetic Llama-like checkpoint (1024x1024 matrices named as in Llama, so a PEFT adapter
maps onto them), commits it, merges a random rank-r LoRA into every matrix as PEFT does (float32,
cast once) and commits that twice in two repositories: plainly, and with --lora. Prints the bytes
the second commit added to each object store and the seconds for add and for a checkout of it.
One run; the machine is shared, so compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def run(cmd, cwd) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()[-400:]}")
    return time.perf_counter() - t


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    per = 1024 * 1024 * (2 if args.dtype == "bf16" else 4)
    n = max(1, args.size_mb * (1 << 20) // per)
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i // 7}.{MODULES[i % 7]}.weight" for i in range(n)]
    base = {k: (torch.randn(1024, 1024, generator=g) * 0.02).to(dtype) for k in names}
    r, alpha = args.rank, 2 * args.rank
    lora = {}
    merged = {}
    for k in names:  # a LoRA's typical size: A ~ U(±1/sqrt(in)), B small after training
        a = (torch.rand(r, 1024, generator=g) * 2 - 1) / 32
        b = torch.randn(1024, r, generator=g) * 1e-3
        mod = k[: -len(".weight")]
        lora[f"base_model.model.{mod}.lora_A.weight"] = a
        lora[f"base_model.model.{mod}.lora_B.weight"] = b
        merged[k] = (base[k].float() + (b @ a) * (alpha / r)).to(dtype)  # PEFT's merge: float32, cast once
    changed = sum(not torch.equal(base[k], merged[k]) for k in names)
    root = Path(tempfile.mkdtemp(prefix="moerge-bench-lowrank-"))
    adapter = root / "adapter"
    adapter.mkdir()
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                             "target_modules": ["q_proj"], "base_model_name_or_path": "x"}))
    rows = {}
    try:
        for mode in ("plain", "lora"):
            repo = root / mode
            repo.mkdir()
            for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "b@example.com"],
                        ["git", "config", "user.name", "bench"], [sys.executable, "-m", "moerge.cli", "git", "install"],
                        [sys.executable, "-m", "moerge.cli", "git", "track"]):
                run(cmd, repo)
            save_file(base, repo / "model.safetensors", metadata={"format": "pt"})
            run(["git", "add", "-A"], repo)
            run(["git", "commit", "-qm", "base"], repo)
            before = du(repo / ".git" / "moerge" / "objects")
            save_file(merged, repo / "model.safetensors", metadata={"format": "pt"})
            add = (["git", "add", "model.safetensors"] if mode == "plain" else
                   [sys.executable, "-m", "moerge.cli", "git", "add", "model.safetensors", "--lora", str(adapter)])
            t_add = run(add, repo)
            run(["git", "commit", "-qm", "lora merged"], repo)
            stored = du(repo / ".git" / "moerge" / "objects") - before
            want = (repo / "model.safetensors").read_bytes()
            (repo / "model.safetensors").unlink()
            t_co = run(["git", "checkout", "--", "model.safetensors"], repo)
            assert (repo / "model.safetensors").read_bytes() == want, "checkout is not bit-identical"
            rows[mode] = {"add": t_add, "stored": stored, "checkout": t_co}
            print(f"{mode} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    dense = changed * per
    print(f"A rank-{r} LoRA merged into {n} {args.dtype} 1024x1024 matrices ({n * per / 2**20:.0f} MiB, {changed} changed, "
          f"{dense / 2**20:.1f} MiB of changed tensors); one run")
    print(f"{'measure':<34}{'git add':>12}{'moerge git add --lora':>24}")
    p, lr = rows["plain"], rows["lora"]
    print(f"{'bytes stored for the commit':<34}{p['stored'] / 2**20:>10.1f} M{lr['stored'] / 2**20:>22.2f} M")
    print(f"{'  share of the changed bytes':<34}{p['stored'] / dense:>12.3f}{lr['stored'] / dense:>24.4f}")
    print(f"{'add (s)':<34}{p['add']:>12.2f}{lr['add']:>24.2f}")
    print(f"{'checkout of that commit (s)':<34}{p['checkout']:>12.2f}{lr['checkout']:>24.2f}")
    print(f"factors take {lr['stored'] / p['stored']:.3%} of the dense objects ({p['stored'] / max(lr['stored'], 1):.0f}x smaller)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
