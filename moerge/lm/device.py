"""Where models compute: ``--device auto|cpu|cuda[:N]|mps`` (and ``$MOERGE_DEVICE``).

``auto`` takes the first CUDA GPU when torch sees one, else Apple's MPS, else the CPU. Asking for a
device this machine does not have is one line saying what torch sees. The commands that compute on
the chosen device so far are expert training and evaluation (of a model, or a model with an expert);
routing, serving, fusion and search compute on the CPU until they do too (issue 31).

Inputs follow the model: ``model_device`` is where a model's weights are, and the generation,
batching and embedding helpers put the tensors they make there (non-blocking from pinned CPU memory
on CUDA), so nothing copies back to the CPU inside a loop but the tokens it returns.
"""

from __future__ import annotations

import os
import re

import torch

from moerge.errors import MoergeError

ENV = "MOERGE_DEVICE"
FORM = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def setting() -> str:
    """``$MOERGE_DEVICE``, checked: auto (default), cpu, cuda, cuda:N or mps."""
    raw = os.environ.get(ENV, "").strip().lower() or "auto"
    if not FORM.match(raw):
        raise MoergeError(f"{ENV}={raw!r}: give auto, cpu, cuda, cuda:N or mps")
    return raw


def set_device(value: str | None) -> str:
    """Choose the device for this process and the processes it starts (``moerge --device``)."""
    if value is None:
        return setting()
    v = value.strip().lower()
    if not FORM.match(v):
        raise MoergeError(f"--device {value!r}: give auto, cpu, cuda, cuda:N or mps")
    resolve(v)  # a device this machine lacks is refused now, before any work
    os.environ[ENV] = v
    return v


def resolve(value: str | torch.device | None = None) -> torch.device:
    """The torch device ``value`` names (None: the setting): ``auto`` is CUDA, else MPS, else the CPU."""
    if isinstance(value, torch.device):
        return value
    v = (value or setting()).strip().lower()
    if not FORM.match(v):
        raise MoergeError(f"device {value!r}: give auto, cpu, cuda, cuda:N or mps")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if v == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("mps") if mps else torch.device("cpu")
    if v.startswith("cuda"):
        if not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
            raise MoergeError(f"--device {v}: torch sees no CUDA device here (this torch {torch.__version__} has {built}); "
                              "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        index = int(v.split(":")[1]) if ":" in v else 0
        if index >= torch.cuda.device_count():
            raise MoergeError(f"--device {v}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
        return torch.device(v)
    if v == "mps" and not mps:
        raise MoergeError("--device mps: torch sees no Apple MPS device here; use --device cpu")
    return torch.device(v)


def model_device(model) -> torch.device:
    """Where a model's weights are: a transformers or PEFT model, a routed model (its ``model``), or
    anything with parameters; the CPU when it has none."""
    for m in (model, getattr(model, "model", None)):
        if m is None:
            continue
        if isinstance(getattr(m, "device", None), torch.device):
            return m.device
        if isinstance(m, torch.nn.Module):
            p = next(m.parameters(), None)
            if p is not None:
                return p.device
    return torch.device("cpu")


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch moved to ``device``: a no-op on the CPU, pinned and non-blocking onto CUDA."""
    if device.type == "cpu":
        return tensors
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
    return {k: v.to(device) for k, v in tensors.items()}
