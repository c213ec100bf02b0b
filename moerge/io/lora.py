"""A base checkpoint with a PEFT LoRA adapter applied, as one lazy tensor source (``base+lora``).

mergekit first materialises such a model to disk through transformers and PEFT; here the low-rank
update W + s·B·A is computed per tensor on request, so ``path+lora_path`` costs no extra pass and no
extra disk.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.io.safetensors_file import TensorInfo
from moerge.io.source import TensorSource, open_source

PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?(\.weight)?$")


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rule: a key matches a module whose dotted name ends with it (as a regex)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load a PEFT adapter folder: its config and its tensors (safetensors, or .bin weights-only)."""
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise MoergeError(f"{folder}: no adapter_config.json; is this a PEFT adapter folder?")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MoergeError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        src = open_source(st)
    elif (folder / "adapter_model.bin").is_file():
        src = open_source(folder / "adapter_model.bin")
    else:
        raise MoergeError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    return config, {n: src.get(n) for n in src.names()}


class LoraAppliedSource:
    """``base`` with the adapter folder ``lora`` merged in, tensor by tensor."""

    def __init__(self, base: TensorSource, lora_dir: Path):
        self.base = base
        self.path = Path(f"{base.path}+{lora_dir}")
        config, tensors = read_adapter(lora_dir)
        ptype = config.get("peft_type", "LORA")
        if ptype != "LORA":
            raise MoergeError(f"{lora_dir}: a {ptype} adapter; only LoRA adapters can be applied with '+'")
        if config.get("use_dora"):
            raise MoergeError(f"{lora_dir}: DoRA adapters are not supported in 'model+lora' yet; merge it with PEFT first")
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = LORA_KEY.match(name)
            if m:
                pairs.setdefault(m["module"], {})[m["kind"]] = t
            elif name in base:  # modules_to_save: a full replacement tensor
                self.replaced[name] = t
            else:
                raise MoergeError(f"{lora_dir}: adapter tensor {key!r} matches nothing in {base.path}; was it made for another base?")
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        for module, parts in pairs.items():
            target = module + ".weight"
            if target not in base:
                raise MoergeError(f"{lora_dir}: adapts {module!r}, which {base.path} lacks; was it made for another base?")
            emb = "lora_embedding_A" in parts
            a = parts.get("lora_embedding_A" if emb else "lora_A")
            b = parts.get("lora_embedding_B" if emb else "lora_B")
            if a is None or b is None:
                raise MoergeError(f"{lora_dir}: module {module!r} has only one of its A/B matrices; the adapter is incomplete")
            r = a.shape[0]
            alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            self.updates[target] = (a, b, scale, emb)
            shape = base.info(target).shape
            if tuple(self._delta(target).shape) != tuple(shape):
                raise MoergeError(f"{lora_dir}: update for {target} has shape {tuple(self._delta(target).shape)} but the base has {tuple(shape)}; was it made for another base?")

    def _delta(self, name: str) -> torch.Tensor:
        a, b, scale, emb = self.updates[name]
        delta = (b.float() @ a.float()) * scale
        if emb or self.fan_in_fan_out:
            delta = delta.T
        return delta

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name].to(self.base.info(name).dtype)
        t = self.base.get(name)
        if name in self.updates:
            t = (t.float() + self._delta(name)).to(t.dtype)
        return t
