"""The embedded default base model: a tiny character-level Llama that knows the prompt format.

It is pretrained on copying (every output symbol), plus a minority of the built-in skills, so it reads
instructions but scores nothing on the expert skills: whatever an expert, a merge or a router
achieves on them is what they added. Built deterministically from a seed in about a minute on two
cores; the weights built by ``moerge base build`` with the defaults ship in the package (4 MB), so the
demo and the tests never wait for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.io.source import open_source
from moerge.lm import device as devices
from moerge.lm import zoo
from moerge.lm.device import device_map, max_memory
from moerge.lm.device import resolve as resolve_device
from moerge.lm.precision import as_dtype, compute_dtype, folder_dtype, model_kwargs
from moerge.util.files import cache_dir  # noqa: F401  (moerge.lm.base.cache_dir: where the built-in base and real bases live)
from moerge.util.progress import quiet_transformers

CONFIG = dict(hidden=128, layers=4, heads=4, intermediate=512, tie=True)
PRETRAIN_STEPS = 600
PRETRAIN_LR = 3e-3
PACKAGED = Path(__file__).parent.parent / "data" / "base"
CARD = "moerge_base.json"


def default_base() -> Path:
    """The base that ``moerge base build`` made in the cache, else the packaged copy."""
    built = cache_dir() / "base"
    if (built / CARD).is_file():
        return built
    if (PACKAGED / CARD).is_file():
        return PACKAGED
    raise MoergeError(f"no built-in base in {built} or {PACKAGED}; run `moerge base build`")


def resolve(base: str | os.PathLike | None) -> Path:
    """The folder a ``--base`` value names: the built-in base when empty, a folder as given, or a real base
    moerge knows by name (``smollm2-135m-instruct``, fetched by ``moerge base get``)."""
    if base is None or str(base) == "":
        return default_base()
    path = Path(base)
    if not path.exists():

        if str(base) in zoo.KNOWN:
            return zoo.resolve(str(base))
    return path


def check_model_folder(folder: Path, what: str = "model") -> None:
    """What ``load`` refuses before transformers sees the folder, each in one line: a path that does not
    exist, a PEFT adapter given as a model, a folder without config.json, and weights that are
    truncated or corrupt (the same header checks the merge engine makes)."""
    if not folder.exists():
        raise MoergeError(f"{folder}: no such folder; check the path")
    if not folder.is_dir():
        raise MoergeError(f"{folder}: is a file; give the {what} folder (saved with save_pretrained) that holds it")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise MoergeError(f"{folder}: is a PEFT adapter, not a model; apply it to its base: --adapter {folder} "
                          f"(or BASE+{folder} in a recipe)")
    if not (folder / "config.json").is_file():
        raise MoergeError(f"{folder}: not a {what} folder (no config.json); pass a folder saved with save_pretrained")
    source = open_source(folder)  # every weights file's header, checked against its size
    close = getattr(source, "close", None)
    if close:
        close()


def contiguous_input(module, args):
    """A forward pre-hook for the output head: transformers hands it the kept positions as a strided
    slice, which torch multiplies through a batched matmul, expanding the head's weight once per row:
    4x slower than the same rows made contiguous in training (a 49k x 576 head), and 3x slower for a
    whole generation in bf16 (SmolLM2-135M with an adapter, measured here). ``load`` hooks every model
    it loads; the training loss hooks whatever model it is given."""
    return (args[0].contiguous(), *args[1:])


def offload_folder() -> str:
    """Where ``--device-map auto`` puts the weights no device has room for: a temporary folder of this
    process, removed when it ends."""
    import atexit
    import shutil
    import tempfile

    global _OFFLOAD
    if _OFFLOAD is None:
        _OFFLOAD = tempfile.mkdtemp(prefix="moerge-offload-")
        atexit.register(shutil.rmtree, _OFFLOAD, True)
    return _OFFLOAD


_OFFLOAD: str | None = None


def load(path: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None, quantization=None):
    """(model, tokenizer) of a base folder (default: the built-in base), in eval mode. Bad folders are
    refused in one line (``check_model_folder``), and whatever transformers still cannot load is
    reported with its first line, never as a traceback. ``dtype``: what to compute in; by default
    ``moerge.lm.precision.compute_dtype`` of the stored one (bf16 checkpoints stay bf16 on CPUs that
    multiply bf16 natively, everything else is float32). ``device``: where it computes (None: the CPU;
    ``moerge.lm.device.resolve`` of a name or of the ``--device`` setting). ``quantization``: a
    transformers quantization config (QLoRA's 4-bit base), loaded straight onto ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve(path)
    check_model_folder(folder)
    quiet_transformers()
    try:
        where = torch.device("cpu") if device is None else resolve_device(device)
        if dtype is None:
            dtype = compute_dtype(folder_dtype(folder), where)
        dtype = as_dtype(dtype)
        spread = device_map() if quantization is None else None
        if quantization is not None:  # quantized weights cannot be moved after loading: load them in place
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization,
                                                         device_map={"": where}, **model_kwargs(dtype, where)).eval()
        elif spread:  # accelerate: over the GPUs, then the CPU, then the disk (a folder that lives as long as the process)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=spread, max_memory=max_memory(),
                                                         offload_folder=offload_folder(),
                                                         **model_kwargs(dtype, where)).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **model_kwargs(dtype, where)).eval()
        if where.type != "cpu" and quantization is None and not spread:
            devices.send_module(model, where)
        tok = AutoTokenizer.from_pretrained(folder)
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(contiguous_input)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, json.JSONDecodeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MoergeError(f"{folder}: transformers cannot load it ({first}); re-save it with save_pretrained") from None
    return model, tok
