"""Reading PEFT adapter folders into experts, and a base with an expert applied as a tensor source.

PEFT writes ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) whose keys are
``base_model.model.<module>.<part>`` where part is ``lora_A.weight``, ``lora_B.weight``,
``lora_embedding_A``/``_B``, ``lora_magnitude_vector`` (DoRA), ``ia3_l`` ((IA)³), sometimes with the
adapter name inside (``lora_A.default.weight``), and full tensors for ``modules_to_save``. All of them
are parsed here, against the base's tensor names and shapes, so an adapter made for another base is
refused before any merge starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.experts.kinds import Dora, LowRank, Replace, Scaling, Update, apply
from moerge.io.safetensors_file import TensorInfo
from moerge.io.source import TensorSource, open_source

PREFIX = "base_model.model."
PART = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|ia3_l)"
    r"(\.[A-Za-z0-9_\-]+)??(\.weight)?$"
)
SAVED_MODULE = re.compile(r"\.modules_to_save\.[^.]+")


@dataclass
class Expert:
    """An adapter (or fine-tune) as updates keyed by base tensor name."""

    kind: str  # lora | dora | ia3 | dense
    updates: dict[str, Update]
    config: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as stored (for export and hashing)
    path: Path | None = None

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name].contiguous()
            h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return "sha256:" + h.hexdigest()


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rule: a key matches a module whose dotted name ends with it (as a regex)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load a PEFT adapter folder: its config and its tensors (safetensors, or .bin weights-only)."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise MoergeError(f"{folder}: no adapter_config.json; is this a PEFT adapter folder?")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MoergeError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            src = open_source(folder / name)
            return config, {n: src.get(n) for n in src.names()}
    raise MoergeError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


def parse_adapter(config: dict, tensors: dict[str, torch.Tensor], base: TensorSource, where: str = "adapter") -> Expert:
    """Turn PEFT's config and tensors into an Expert, checked against the base's names and shapes."""
    ptype = config.get("peft_type", "LORA")
    if ptype == "DENSE":  # a full fine-tune, stored as the tensors it changed
        for name, t in tensors.items():
            if name not in base or tuple(base.info(name).shape) != tuple(t.shape):
                raise MoergeError(f"{where}: tensor {name} does not fit {base.path}; was it made for another base?")
        return Expert("dense", {n: Replace(t) for n, t in tensors.items()}, config, tensors)
    if ptype not in ("LORA", "IA3"):
        raise MoergeError(f"{where}: a {ptype} adapter; moerge reads LoRA, DoRA and (IA)3 adapters")
    kind = "ia3" if ptype == "IA3" else "dora" if config.get("use_dora") else "lora"
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    updates: dict[str, Update] = {}

    def another_base(what: str) -> MoergeError:
        return MoergeError(f"{where}: {what} in {base.path}; was it made for another base?")

    for key, t in tensors.items():
        name = SAVED_MODULE.sub("", key[len(PREFIX):] if key.startswith(PREFIX) else key)
        m = PART.match(name)
        if ".base_layer." in name:  # PEFT saves targeted embeddings' own weights: they must be the base's
            own = name.replace(".base_layer.", ".")
            if own not in base or not torch.equal(base.get(own), t.to(base.info(own).dtype)):
                raise another_base(f"the adapter carries its own {own} (resized or retrained embeddings), which differs")
        elif m:
            parts.setdefault(m["module"], {})[m["part"]] = t
        elif name in base:
            updates[name] = Replace(t)
        else:
            raise another_base(f"adapter tensor {key!r} matches nothing")
    for module, p in parts.items():
        target = module + ".weight"
        if target not in base:
            raise another_base(f"the adapter changes {module!r}, which is missing")
        if "ia3_l" in p:
            updates[target] = Scaling(p["ia3_l"], fan_in_fan_out)
            if p["ia3_l"].shape[-1] == 1 and module + ".bias" in base:
                updates[module + ".bias"] = Scaling(p["ia3_l"])
            continue
        emb = "lora_embedding_A" in p
        a, b = p.get("lora_embedding_A" if emb else "lora_A"), p.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None:
            raise MoergeError(f"{where}: module {module!r} has only one of its A/B matrices; the adapter is incomplete")
        r = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transpose = emb or fan_in_fan_out
        if "lora_magnitude_vector" in p:
            updates[target] = Dora(a, b, scale, transpose, p["lora_magnitude_vector"])
        else:
            updates[target] = LowRank(a, b, scale, transpose)
    for target, u in updates.items():
        want = tuple(base.info(target).shape)
        if isinstance(u, Scaling):
            v = u.vector.T if u.transpose else u.vector
            ok = target.endswith(".bias") and v.numel() == want[0] or (
                len(want) == 2 and all(d in (1, w) for d, w in zip(v.shape, want)))
            got = tuple(v.shape)
        else:
            got = tuple(u.shape())
            ok = got == want
        if not ok:
            raise another_base(f"the update for {target} has shape {got} but the base tensor is {want}")
    return Expert(kind, updates, config, tensors)


def load_finetune(folder: str | Path, base: TensorSource) -> Expert:
    """A full fine-tune as a dense expert: the tensors that differ from the base (all must fit it)."""
    ft = open_source(folder)
    missing = [n for n in base.names() if n not in ft]
    if missing:
        raise MoergeError(f"{folder}: lacks tensor {missing[0]!r} that the base {base.path} has; is it a fine-tune of that base?")
    changed = {}
    for name in ft.names():
        if name not in base:
            raise MoergeError(f"{folder}: has tensor {name!r} that the base {base.path} lacks; was it made for another base?")
        if tuple(ft.info(name).shape) != tuple(base.info(name).shape):
            raise MoergeError(f"{folder}: tensor {name} has shape {tuple(ft.info(name).shape)} but the base has "
                              f"{tuple(base.info(name).shape)}; was it made for another base?")
        t = ft.get(name)
        if not torch.equal(t, base.get(name)):
            changed[name] = t
    if not changed:
        raise MoergeError(f"{folder}: every tensor equals the base's ({base.path}); there is no expert to add")
    expert = parse_adapter({"peft_type": "DENSE"}, changed, base, str(folder))
    expert.path = Path(folder)
    return expert


def load_expert_folder(folder: str | Path, base: TensorSource) -> Expert:
    """A PEFT adapter folder, or a full fine-tune (a model folder)."""
    folder = Path(folder)
    if not folder.exists():
        raise MoergeError(f"{folder}: no such folder")
    if (folder / "adapter_config.json").is_file():
        return load_adapter(folder, base)
    return load_finetune(folder, base)


def load_adapter(folder: str | Path, base: TensorSource) -> Expert:
    config, tensors = read_adapter(Path(folder))
    expert = parse_adapter(config, tensors, base, str(folder))
    expert.path = Path(folder)
    return expert


class ExpertAppliedSource:
    """``base`` with an expert applied, tensor by tensor (what ``model: base+adapter`` reads)."""

    def __init__(self, base: TensorSource, expert: Expert, label: str):
        self.base = base
        self.expert = expert
        self.path = Path(f"{base.path}+{label}")

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def get(self, name: str) -> torch.Tensor:
        t = self.base.get(name)
        update = self.expert.updates.get(name)
        return t if update is None else apply(t, update)
