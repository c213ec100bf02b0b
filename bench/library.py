#!/usr/bin/env python
"""Expert library at scale: adding 100 rank-16 LoRA experts of a 1B-parameter-shaped base.

    python bench/library.py [--n 100] [--rank 16] [--work /tmp/moerge-library-bench]

The base is Llama-3.2-1B-shaped (hidden 2048, intermediate 8192, 16 layers, 8 KV heads, vocab 128256)
but its weights are a sparse file of zeros: adding only reads the base's header (names, shapes) and
fingerprint samples. Each expert is a random bf16 LoRA on every linear layer (q, k, v, o, gate, up,
down). Prints seconds per add (median and p95), catalog query times, and the store's size against
the sum of the adapters' sizes, then re-adds one adapter ten times under new names to show that
identical content costs no bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

import torch

CONFIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_shapes() -> dict[str, tuple[int, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def write_sparse_base(folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid bf16 safetensors file whose data region is a hole (reads as zeros, costs no disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps(CONFIG | {"model_type": "llama", "torch_dtype": "bfloat16"}))


def write_adapter(folder: Path, shapes: dict[str, tuple[int, ...]], rank: int, seed: int) -> int:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in ((n, s) for n, s in shapes.items() if n.split(".")[-2] in MODULES):
        module = name[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}))
    return (folder / "adapter_model.safetensors").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moerge-library-bench")
    args = ap.parse_args()

    from moerge.library import Library

    shutil.rmtree(args.work, ignore_errors=True)
    shapes = base_shapes()
    write_sparse_base(args.work / "base", shapes)
    t0 = time.perf_counter()
    sizes = [write_adapter(args.work / "adapters" / f"a{i:03d}", shapes, args.rank, i) for i in range(args.n)]
    gen_s = time.perf_counter() - t0

    lib = Library.init(args.work / "lib", args.work / "base")
    adds = []
    for i in range(args.n):
        t = time.perf_counter()
        lib.add(args.work / "adapters" / f"a{i:03d}", f"expert-{i:03d}", task=f"task{i % 10}", tags=["bench"])
        adds.append(time.perf_counter() - t)
    stats = lib.stats()

    queries = {}
    for label, fn in (("list all (latest versions)", lambda: lib.experts(latest=True)),
                      ("list by task", lambda: lib.experts(task="task3")),
                      ("get one by name", lambda: lib.get("expert-042" if args.n > 42 else "expert-000"))):
        t = time.perf_counter()
        for _ in range(20):
            fn()
        queries[label] = (time.perf_counter() - t) / 20

    before = lib.stats()["stored_bytes"]
    readd = []
    for j in range(10):
        t = time.perf_counter()
        lib.add(args.work / "adapters" / "a000", f"copy-{j}")
        readd.append(time.perf_counter() - t)
    growth = lib.stats()["stored_bytes"] - before
    t = time.perf_counter()
    problems, orphans = lib.verify()
    verify_s = time.perf_counter() - t

    q = sorted(adds)
    print(f"{args.n} LoRA experts, rank {args.rank}, bf16, {len(shapes)}-tensor 1B-shaped base "
          f"({sizes[0] / 1e6:.1f} MB per adapter; generating them took {gen_s:.1f} s, not counted)")
    print(f"{'measure':<40} {'value':>14}")
    print(f"{'add: median s':<40} {statistics.median(adds):>14.3f}")
    print(f"{'add: p95 s':<40} {q[int(0.95 * (len(q) - 1))]:>14.3f}")
    print(f"{'add: total s':<40} {sum(adds):>14.1f}")
    for label, s in queries.items():
        print(f"{'query: ' + label + ' ms':<40} {1000 * s:>14.2f}")
    print(f"{'sum of adapter files MB':<40} {sum(sizes) / 1e6:>14.1f}")
    print(f"{'store (blobs) MB':<40} {stats['stored_bytes'] / 1e6:>14.1f}")
    print(f"{'catalog MB':<40} {(args.work / 'lib' / 'catalog.sqlite').stat().st_size / 1e6:>14.2f}")
    print(f"{'re-add same adapter x10: store growth B':<40} {growth:>14d}")
    print(f"{'re-add: median s':<40} {statistics.median(readd):>14.3f}")
    print(f"{'verify (re-hash all) s':<40} {verify_s:>14.1f}")
    print(f"{'verify problems / orphans':<40} {f'{len(problems)} / {len(orphans)}':>14}")


if __name__ == "__main__":
    main()
