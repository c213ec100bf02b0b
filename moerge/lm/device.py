"""Where models compute: ``--device auto|cpu|cuda[:N]|mps`` (and ``$MOERGE_DEVICE``).

``auto`` takes the first CUDA GPU when torch sees one, else Apple's MPS, else the CPU. Asking for a
device this machine does not have is one line saying what torch sees. Training, evaluation, routing
and serving compute on the chosen device; the merge engine streams on the CPU.

A base bigger than one device: ``--device-map auto`` (``$MOERGE_DEVICE_MAP``) spreads it with
accelerate over the GPUs, then the CPU, then the disk (``--max-memory 0=20GiB,cpu=64GiB``,
``$MOERGE_MAX_MEMORY``: how much of each to use). Evaluation, routing and serving run on any such map:
the mixture runtime keeps its banks where each layer computes and reads an offloaded layer's weights
once per call (``weights_in``, ``plain_call``).

Inputs follow the model: ``model_device`` is where a model's weights are, and the generation,
batching and embedding helpers put the tensors they make there (non-blocking from pinned CPU memory
on CUDA), so nothing copies back to the CPU inside a loop but the tokens it returns.
"""

from __future__ import annotations

import contextlib
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


def explicit() -> str | None:
    """The device the user named (``--device``, ``$MOERGE_DEVICE``), None when it is left to ``auto``'s
    default: merges stay on the CPU unless asked (mergekit's ``--cuda``), since they stream tensors
    from disk and gain from a GPU only on large models."""
    v = os.environ.get(ENV, "").strip().lower()
    return setting() if v else None


def named(device: str | None = None) -> torch.device | None:
    """Where a merge, a fusion, a search or their statistics compute: ``device``, else the one the user
    named (``explicit``), resolved; None (the CPU) when neither says."""
    name = device or explicit()
    return resolve(name) if name else None


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


MAP_ENV, MEMORY_ENV = "MOERGE_DEVICE_MAP", "MOERGE_MAX_MEMORY"


def set_device_map(value: str | None) -> str | None:
    """``moerge --device-map auto``: bases load spread over the devices (accelerate) in this process."""
    if value is None:
        return os.environ.get(MAP_ENV) or None
    if value.strip().lower() != "auto":
        raise MoergeError(f"--device-map {value!r}: give auto (accelerate spreads the model over GPUs, CPU and disk)")
    os.environ[MAP_ENV] = "auto"
    return "auto"


def set_max_memory(value: str | None) -> dict | None:
    """``moerge --max-memory 0=20GiB,cpu=64GiB``: what ``--device-map auto`` may use of each device."""
    if value is None:
        return max_memory()
    parsed = parse_max_memory(value)
    os.environ[MEMORY_ENV] = value
    return parsed


AMOUNT = re.compile(r"^(\d+(\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?$", re.IGNORECASE)


def parse_max_memory(spec: str) -> dict:
    """``0=20GiB,cpu=64GiB`` -> {0: "20GiB", "cpu": "64GiB"} (GPU indices as ints, as accelerate wants),
    every device named once, every amount positive, every GPU one torch sees."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, amount = part.partition("=")
        key, amount = key.strip().lower().removeprefix("cuda:"), amount.strip()
        if not sep or not (key.isdigit() or key in ("cpu", "mps")):
            raise MoergeError(f"--max-memory {spec!r}: give DEVICE=AMOUNT pairs, e.g. 0=20GiB,cpu=64GiB "
                              "(a GPU index, cpu or mps; amounts as 20GiB, 500MB or bytes)")
        m = AMOUNT.match(amount)
        if not m or float(m.group(1)) <= 0:
            raise MoergeError(f"--max-memory {spec!r}: {key}={amount!r} is not an amount; write it as 20GiB, 500MB or "
                              "a byte count, above 0")
        device = int(key) if key.isdigit() else key
        if device in out:
            raise MoergeError(f"--max-memory {spec!r}: {key} is named twice; give each device once")
        if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise MoergeError(f"--max-memory {spec!r}: torch sees no Apple MPS device here; name the GPUs by index, and cpu")
        if isinstance(device, int) and device >= torch.cuda.device_count():
            raise MoergeError(f"--max-memory {spec!r}: there is no GPU {device} (torch sees {torch.cuda.device_count()}); "
                              "name the GPUs by index from 0, and cpu")
        out[device] = int(amount) if amount.isdigit() else amount
    return out


def device_map() -> str | None:
    """The ``--device-map`` setting: "auto", or None (the model goes whole onto ``--device``)."""
    v = os.environ.get(MAP_ENV, "").strip().lower()
    if v and v != "auto":
        raise MoergeError(f"{MAP_ENV}={v!r}: give auto, or unset it")
    return v or None


def max_memory() -> dict | None:
    v = os.environ.get(MEMORY_ENV, "").strip()
    return parse_max_memory(v) if v else None


def dispatched(model) -> dict | None:
    """A model spread by accelerate: its device map (module -> GPU index, "cpu", "mps" or "disk"), else None."""
    for m in (model, getattr(model, "model", None), getattr(model, "base_model", None)):
        found = getattr(m, "hf_device_map", None) if m is not None else None
        if found:
            return found
    return None


def offloaded(model) -> list[str]:
    """The modules of a spread model whose own weights are copied in at each call (from the disk, or
    from the CPU while the GPUs compute)."""
    return [name for name, m in model.named_modules() if is_offloaded(m)]


def _as_device(d) -> torch.device:
    return torch.device(f"cuda:{d}" if isinstance(d, int) else "cpu" if d == "disk" else d)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when it spread the model (an offloaded
    layer's weights wait on the CPU or disk and are copied there for each call), else where its
    weights are."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return _as_device(hook.execution_device)
    p = next((p for p in module.parameters() if not p.is_meta), None)
    return p.device if p is not None else torch.device("cpu")


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate copies ``module``'s own weights in for each call (CPU or disk offload)."""
    return bool(getattr(getattr(module, "_hf_hook", None), "offload", False))


@contextlib.contextmanager
def weights_in(module: torch.nn.Module):
    """``module``'s offloaded weights on its execution device for the duration, for code that reads them
    outside one call (the mixture runtime computes beside the layer); call the layer inside with
    ``plain_call``, which does not copy them in (and out) again. A no-op for a module in place."""
    if not is_offloaded(module):
        yield
        return
    hook = module._hf_hook
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


def plain_call(module: torch.nn.Module, *args, **kwargs):
    """``module(*args)`` without accelerate's hook (inside ``weights_in``: the weights are already there)."""
    if is_offloaded(module):
        return module._old_forward(*args, **kwargs)
    return module(*args, **kwargs)


def model_device(model) -> torch.device:
    """Where a model's weights are: a transformers or PEFT model, a routed model (its ``model``), or
    anything with parameters; the CPU when it has none. A model spread by accelerate: where its first
    module computes (inputs go there; accelerate's hooks move them on)."""
    where = dispatched(model)
    if where:  # the main execution device (accelerate's top hook), else the first module's
        for m in (model, getattr(model, "model", None), getattr(model, "base_model", None)):
            if getattr(getattr(m, "_hf_hook", None), "execution_device", None) is not None:
                return _as_device(m._hf_hook.execution_device)
        return _as_device(next(iter(where.values())))
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


def send(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """One tensor read on the host, on the device a computation runs on (None: where it is). The one
    place the merge engine and its statistics move inputs (a test traces what passes through it)."""
    return t if device is None or t.device == device else t.to(device, non_blocking=True)


def send_module(module: torch.nn.Module, device: torch.device | None) -> torch.nn.Module:
    """``module.to(device)``, each parameter and buffer through ``send`` (in place: tied weights stay tied);
    tensors on the meta device (a skeleton's weights, loaded later) are left where they are."""
    if device is None:
        return module
    for mod in module.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None and not t.is_meta:
                t.data = send(t.data, device)
    return module


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch moved to ``device`` through ``send``: a no-op on the CPU, pinned and non-blocking onto CUDA."""
    pin = device.type == "cuda"
    return {k: send(v.pin_memory() if pin and v.device.type == "cpu" else v, device) for k, v in tensors.items()}
