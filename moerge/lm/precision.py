"""The dtype models compute in: the stored bf16 where the CPU multiplies bf16 natively, else float32.

Why not always float32: on a CPU with bf16 matrix units (Intel AMX, measured here: a 448x576 by
576x1536 matmul at 1,300 GFLOPS in bf16 against 190 in float32 on one thread), a bf16 checkpoint
such as SmolLM2 generates 2.6x and trains LoRA 1.7x faster in its own dtype. Why not always the
stored dtype: on CPUs without them, bf16 matmuls are emulated and run 2-4x *slower* than float32.
So ``auto`` (the default) measures once per process which way this CPU goes, and keeps the stored
dtype only when bf16 wins; a float32 checkpoint (the built-in tiny base, every merge written in
float32) always computes in float32, as transformers' own ``dtype="auto"`` would load it.

``$MOERGE_DTYPE`` (or ``moerge --dtype``) overrides: ``float32`` everywhere, or ``bfloat16`` for every
bf16 checkpoint whatever the CPU. Code that needs float32 whatever the setting (full fine-tunes, whose
weights the optimizer updates; Fisher statistics, squared gradients) asks for it explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch

from moerge.errors import MoergeError
from moerge.lm.device import model_device

ENV = "MOERGE_DTYPE"
CHOICES = ("auto", "float32", "bfloat16")
NAMES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
         "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def setting() -> str:
    """``$MOERGE_DTYPE``, checked: auto (default), float32 or bfloat16."""
    raw = os.environ.get(ENV, "").strip().lower() or "auto"
    raw = {"fp32": "float32", "bf16": "bfloat16"}.get(raw, raw)
    if raw not in CHOICES:
        raise MoergeError(f"{ENV}={raw!r}: give one of {', '.join(CHOICES)}")
    return raw


def set_dtype(value: str | None) -> str:
    """Set the compute dtype for this process and the processes it starts (``moerge --dtype``)."""
    if value is None:
        return setting()
    if not value.strip():
        raise MoergeError(f"--dtype {value!r}: give one of {', '.join(CHOICES)}")
    os.environ[ENV] = value
    try:
        return setting()
    except MoergeError:
        os.environ.pop(ENV, None)
        raise MoergeError(f"--dtype {value}: give one of {', '.join(CHOICES)}") from None


@functools.lru_cache(maxsize=1)
def fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices at least 1.5x faster than float32, timed once (a few ms)
    on one thread: a flag such as ``amx_bf16`` says what the chip has, not what torch's kernels make of
    it. One thread because two threads beside a busy neighbour time the machine's noise instead (the
    answer flipped in 2 of 12 runs at two threads, 9 of 10 beside ``yes``; never at one)."""
    a = torch.randn(256, 576)
    w = torch.randn(1536, 576)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y.T  # warm-up: the first call picks the kernel
        times = []
        for _ in range(5):
            t = time.perf_counter()
            x @ y.T
            times.append(time.perf_counter() - t)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best(a.bfloat16(), w.bfloat16()) * 1.5 < best(a, w)
    finally:
        torch.set_num_threads(threads)


def as_dtype(value: torch.dtype | str) -> torch.dtype:
    """A torch dtype, or its name (``"bfloat16"``, ``"bf16"``, ``"float32"``, ...)."""
    if isinstance(value, torch.dtype):
        return value
    found = NAMES.get(str(value).strip().lower().removeprefix("torch."))
    if found is None:
        raise MoergeError(f"dtype {value!r}: give float32 or bfloat16 (or a torch.dtype)")
    return found


def stored_dtype(config: dict) -> torch.dtype | None:
    """The dtype a transformers ``config.json`` says its weights are stored in (None if it does not say)."""
    if not isinstance(config, dict):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return NAMES.get(str(name).removeprefix("torch.")) if name else None


def folder_dtype(folder) -> torch.dtype | None:
    """The stored dtype of a model folder, from its config.json (which the caller has checked exists)."""
    import json
    from pathlib import Path

    return stored_dtype(json.loads((Path(folder) / "config.json").read_text()))


def compute_dtype(stored: torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """The dtype to compute in for weights stored as ``stored`` on ``device`` (default the CPU): bf16
    only for a bf16 checkpoint, and under ``auto`` only where the device runs bf16 well: a GPU that
    supports it, a CPU that multiplies bf16 faster (``fast_bf16``); float32 otherwise (float16
    checkpoints too: CPU float16 kernels are slow)."""
    choice = setting()
    if stored != torch.bfloat16 or choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device is not None and device.type == "mps":
        return torch.float32
    return torch.bfloat16 if fast_bf16() else torch.float32


def model_kwargs(dtype: torch.dtype, device: torch.device | None = None) -> dict:
    """transformers loading arguments for computing in ``dtype`` on ``device`` (default the CPU): eager
    attention in bf16 on the CPU, where torch's CPU flash attention ran its backward 4x slower than the
    plain matmuls (SmolLM2-135M LoRA training, measured here); the default attention otherwise (on a
    GPU, its fused kernels)."""
    on_cpu = device is None or device.type == "cpu"
    return {"attn_implementation": "eager"} if dtype == torch.bfloat16 and on_cpu else {}


def autocast_for(model: torch.nn.Module):
    """A context that trains ``model`` in mixed precision when its frozen weights are bf16 (float32
    adapter weights, bf16 matmuls, float32 loss); a no-op for a float32 model."""
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return torch.autocast(model_device(model).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
