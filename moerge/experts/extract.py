"""A full fine-tune as a LoRA adapter: truncated SVD of each linear layer's delta (extract-lora).

The result is a PEFT folder that ``PeftModel.from_pretrained`` loads, plus ``moerge_extract.json``
with the share of each layer's delta energy that the rank keeps: the number a user needs to choose
the rank. Tensors a LoRA cannot carry (norms, embeddings, the LM head) are listed with the size of
their change rather than silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.experts.lowrank import factorize
from moerge.experts.peft_format import write_adapter
from moerge.io.hub import resolve
from moerge.io.source import open_source
from moerge.lm.arch import checkpoint_names
from moerge.util.files import check_output_dir

PREFIX = "base_model.model."


@dataclass
class Extraction:
    out_dir: Path
    rank: int
    layers: list[dict] = field(default_factory=list)  # module, shape, rank, energy
    skipped: list[dict] = field(default_factory=list)  # tensor, max_abs_change

    @property
    def mean_energy(self) -> float:
        return sum(r["energy"] for r in self.layers) / len(self.layers) if self.layers else 1.0


def _is_linear(name: str, t_shape: tuple[int, ...]) -> bool:
    return len(t_shape) == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


def _stored_otherwise(base_dir, base) -> set[str]:
    """The checkpoint tensors the loaded model holds under another name or stacked (an MoE base's
    experts and router): a LoRA keyed by their stored names would not load in PEFT."""
    import json

    try:
        model_type = json.loads((Path(base_dir) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return set()
    renamed, fused = checkpoint_names(model_type, list(base.names()))
    return set(renamed.values()) | {p.name for pieces in fused.values() for p in pieces}


def extract_lora(finetune: str | os.PathLike, base: str | os.PathLike, out_dir: str | os.PathLike, *, rank: int = 16,
                 overwrite: bool = False) -> Extraction:
    if rank < 1:
        raise MoergeError(f"--rank must be at least 1, got {rank}")
    check_output_dir(out_dir, overwrite)
    ft_dir, base_dir = resolve(str(finetune)), resolve(str(base))
    ft, b = open_source(ft_dir), open_source(base_dir)
    linear = [tuple(b.info(n).shape) for n in b.names() if _is_linear(n, tuple(b.info(n).shape))]
    lora_params = sum(min(rank, m, n) * (m + n) for m, n in linear)
    dense_params = sum(m * n for m, n in linear)
    if linear and lora_params >= dense_params:
        useful = min(m * n // (m + n) for m, n in linear)
        raise MoergeError(f"--rank {rank}: a LoRA of that rank ({lora_params:,} parameters) is no smaller than the linear "
                          f"layers' full deltas ({dense_params:,}); use a rank below {useful + 1}, or merge the fine-tune "
                          "as it is (it is its own expert)")
    result = Extraction(Path(out_dir), rank)
    stacked = _stored_otherwise(base_dir, b)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in b.names():
        if name not in ft:
            raise MoergeError(f"{ft_dir}: lacks tensor {name!r} that the base {base_dir} has; is it a fine-tune of that base?")
        fi, bi = ft.info(name), b.info(name)
        if tuple(fi.shape) != tuple(bi.shape):
            raise MoergeError(f"{ft_dir}: tensor {name} has shape {tuple(fi.shape)} but the base has {tuple(bi.shape)}")
        if not bi.dtype.is_floating_point:
            continue
        delta = ft.get(name).float() - b.get(name).float()
        if not bool(delta.any()):
            continue
        if not _is_linear(name, tuple(bi.shape)) or name in stacked:
            result.skipped.append({"tensor": name, "max_abs_change": float(delta.abs().max())}
                                  | ({"why": "an MoE base's expert or router, stacked or renamed when the model loads: "
                                      "PEFT's LoRA on it is a parameter LoRA, not extracted"} if name in stacked else {}))
            continue
        module = name[: -len(".weight")]
        a, bb, energy = factorize(delta, rank)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = bb.contiguous()
        ranks[module] = a.shape[0]
        result.layers.append({"module": module, "shape": list(bi.shape), "rank": a.shape[0], "energy": round(energy, 6)})
    if not tensors:
        raise MoergeError(f"{ft_dir}: no linear layer differs from {base_dir}; nothing to extract")
    rank = result.rank = max(ranks.values())  # no layer gets more than min(out, in), whatever was asked
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(ranks), "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != rank},  # keeps every scale at 1
        "base_model_name_or_path": str(base), "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
    }
    write_adapter(result.out_dir, config, tensors, base_dir, task=None, made_by="extract", overwrite=overwrite,
                  report={"finetune": str(finetune), "base": str(base), "rank": rank, "mean_energy": result.mean_energy,
                          "layers": result.layers, "not_extracted": result.skipped})
    return result
