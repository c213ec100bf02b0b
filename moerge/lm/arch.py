"""What depends on a model's architecture, read from the model (its config and its layer names) and
one small table, not from Llama's names.

(IA)³ scales the attention keys and values and the feed-forward activations (Liu et al. 2022), so it
needs to know which linear layers those are in each family. PEFT's own table answers for the families
it lists; ``IA3`` below adds the ones it does not (fused projections included: Phi-3's ``qkv_proj``
scales queries, keys and values together, as GPT-NeoX's ``query_key_value`` does in PEFT's table).
A family neither table knows is read from its layer names; one line when that finds nothing.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from moerge.errors import MoergeError

if TYPE_CHECKING:
    import torch

# model_type -> (target modules, the feed-forward ones among them): families PEFT's table lacks
IA3: dict[str, tuple[list[str], list[str]]] = {
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "olmo2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "granite": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}
KEYS_VALUES = (("k_proj", "v_proj"), ("qkv_proj",), ("query_key_value",), ("Wqkv",), ("c_attn",))
FEED_FORWARD_OUT = ("down_proj", "dense_4h_to_h", "fc2", "w2", "c_proj")


def linear_names(model) -> set[str]:
    """The last name part of every linear layer (``k_proj``, ``dense_4h_to_h``, ...)."""
    from torch import nn

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def ia3_modules(model) -> tuple[list[str], list[str]]:
    """(target modules, feed-forward modules) of (IA)³ for ``model``: this file's table, else PEFT's,
    else the model's own layer names; each checked against the layers the model has."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    kind = getattr(model.config, "model_type", "?")
    have = linear_names(model)
    if kind in IA3:
        targets, ff = IA3[kind]
    elif kind in PEFT_TARGETS and kind in PEFT_FF:
        targets, ff = list(PEFT_TARGETS[kind]), list(PEFT_FF[kind])
    else:
        attn = next((list(group) for group in KEYS_VALUES if all(n in have for n in group)), [])
        ff = [n for n in FEED_FORWARD_OUT if n in have][:1]
        targets = attn + ff
    missing = [n for n in targets if n not in have]
    if not targets or not ff or missing:
        raise MoergeError(f"(IA)3 on {kind}: cannot tell which linear layers are its attention keys/values and its "
                          f"feed-forward output ({'missing ' + ', '.join(missing) if missing else 'none found'}; its "
                          f"linear layers: {', '.join(sorted(have))}); use --adapter lora"
                          + ("" if any(p.dim() == 3 for p in model.parameters()) else " or dora"))
    return targets, ff


def stacked_parameters(model) -> list[str]:
    """The 3-D parameters of ``model`` (an MoE base's stacked experts), as PEFT's target_parameters
    names them (``experts.gate_up_proj``): LoRA trains them too, one pair of factors per expert."""
    return sorted({".".join(n.split(".")[-2:]) for n, p in model.named_parameters() if p.dim() == 3})


@dataclass
class Piece:
    """One tensor of a checkpoint that transformers fuses into a stacked parameter when it loads the
    model: expert ``expert``'s ``index``-th of ``count`` equal slices along ``dim`` (1: outputs,
    2: inputs) of the stack. Mixtral's ``experts.3.w1.weight`` is expert 3's first half of the
    outputs of ``experts.gate_up_proj``."""

    name: str
    expert: int
    index: int
    count: int
    dim: int


def checkpoint_names(model_type: str, names: list[str]) -> tuple[dict[str, str], dict[str, list[Piece]]]:
    """How the model's parameter names meet a checkpoint's tensor ``names``: (renamed: model name ->
    checkpoint name, fused: stacked model parameter -> the checkpoint pieces it is made of).

    Read from transformers' own conversion mapping for the family (what ``from_pretrained``
    applies: renamings, then experts stacked with MergeModulelist and gate/up joined with
    Concatenate), run forward on each checkpoint name; empty for families stored as loaded."""
    return _checkpoint_names(model_type, tuple(names))


@functools.lru_cache(maxsize=8)
def _checkpoint_names(model_type: str, names: tuple[str, ...]) -> tuple[dict[str, str], dict[str, list[Piece]]]:
    """``checkpoint_names``, once per checkpoint: every expert read against a base asks it again
    (shared results: read them, do not change them)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: checkpoints are stored as loaded
        return {}, {}
    steps = get_checkpoint_conversion_mapping(model_type) or []
    renamed: dict[str, str] = {}
    fused: dict[str, list[Piece]] = {}
    for disk in names:
        name = disk
        for step in steps:
            sources, targets = list(step.source_patterns), list(step.target_patterns)
            if type(step).__name__ == "WeightRenaming":
                for src, dst in zip(sources, targets):
                    name = re.sub(src, dst, name)
                continue
            ops = [type(o).__name__ for o in getattr(step, "operations", [])]
            if len(targets) != 1 or ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]):
                continue  # a conversion this reading does not cover: its tensors stay unmatched
            dim = getattr(step.operations[-1], "dim", 1) if len(ops) == 2 else 1
            for j, src in enumerate(sources):
                m = re.search(re.escape(src).replace(r"\*", r"(\d+)"), name)
                if m and m.groups():
                    model_name = name[: m.start()] + targets[0] + name[m.end():]
                    fused.setdefault(model_name, []).append(Piece(disk, int(m.group(1)), j, len(sources), dim))
                    name = None
                    break
            if name is None:
                break
        if name is not None and name != disk:
            renamed[name] = disk
    return renamed, fused


def checkpoint_reader(model_type: str, source) -> Callable[[str], "torch.Tensor | None"]:
    """A function giving each of the model's parameters (as the loaded model names them) from a
    checkpoint ``source`` that may store them otherwise: renamed, or as pieces to stack (an MoE base's
    experts, one tensor per expert and projection on disk, one stack per layer in the model). None
    for a parameter the checkpoint lacks. What the engine uses wherever it builds a model from a
    tensor source instead of ``from_pretrained``."""
    import torch

    renamed: dict | None = None  # read from the checkpoint's names on the first name it lacks
    fused: dict = {}

    def get(name: str):
        nonlocal renamed, fused
        if name in source:
            return source.get(name)
        if renamed is None:
            renamed, fused = checkpoint_names(model_type, list(source.names()))
        if name in renamed:
            return source.get(renamed[name])
        if name in fused:
            by_expert: dict[int, list[Piece]] = {}
            for piece in fused[name]:
                by_expert.setdefault(piece.expert, []).append(piece)
            return torch.stack([torch.cat([source.get(p.name) for p in sorted(by_expert[k], key=lambda p: p.index)],
                                          dim=by_expert[k][0].dim - 1) for k in sorted(by_expert)])
        return None

    return get


def as_stored(model_type: str, tensors: dict, names: list[str]) -> dict:
    """``tensors`` keyed by the loaded model's parameter names, re-keyed as the checkpoint (whose
    tensor ``names`` are given) stores them: renamed, and stacks cut into their pieces. The inverse
    of ``checkpoint_reader``, for per-parameter results such as a Fisher."""
    renamed, fused = checkpoint_names(model_type, names)
    out = {}
    for name, t in tensors.items():
        if name in fused and t.dim() == 3:
            for p in fused[name]:
                size = t.shape[p.dim] // p.count
                out[p.name] = t[p.expert].narrow(p.dim - 1, p.index * size, size).contiguous()
        else:
            out[renamed.get(name, name)] = t
    return out


@dataclass
class ModelLayout:
    """What a model class says about its parameters, read from the meta-device model."""

    model_type: str
    params: dict[str, list[str]]  # module -> its own parameters, in declaration order
    transposed: set[str] = field(default_factory=set)  # modules whose 3-D stacks are (experts, in, out)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # parameter -> shape, as the model holds it

    def checkpoint_names(self, names: list[str]) -> tuple[dict[str, str], dict[str, list[Piece]]]:
        """``checkpoint_names`` for this model's family."""
        return checkpoint_names(self.model_type, names)


def parameter_layout(folder) -> ModelLayout | None:
    """The layout of the model in ``folder`` (its config.json, no weights read): for each module that
    holds parameters of its own, their names in declaration order, and which modules keep 3-D
    stacks as (experts, in, out) (``is_transposed``). None when transformers cannot build it.

    Why declaration order: PEFT wraps the parameters it targets on one module (an MoE layer's
    ``gate_up_proj`` and ``down_proj``) in nested wrappers, the first declared innermost, and saves
    each wrapper's factors under the module's name with one ``base_layer`` per level of nesting;
    only this order says which factors belong to which parameter."""
    from pathlib import Path

    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    if not (folder / "config.json").is_file():
        return None
    return _layout(str(folder.resolve()))


_LAYOUTS: dict[str, ModelLayout | None] = {}


def _layout(folder: str) -> ModelLayout | None:
    if folder in _LAYOUTS:
        return _LAYOUTS[folder]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture this transformers cannot build: the caller falls back on shapes
        _LAYOUTS[folder] = None
        return None
    params = {name: [p for p, _ in m.named_parameters(recurse=False)]
              for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    transposed = {name for name, m in model.named_modules() if getattr(m, "is_transposed", False)}
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    _LAYOUTS[folder] = ModelLayout(getattr(config, "model_type", "?"), params, transposed, shapes)
    return _LAYOUTS[folder]
