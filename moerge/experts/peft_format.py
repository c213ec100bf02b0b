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
from moerge.experts.card import ExpertCard, read_card, recorded_base
from moerge.experts.kinds import Dora, LowRank, Replace, Scaling, StackedLowRank, Update, apply
from moerge.experts.lowrank import combine_adapters
from moerge.io.fingerprint import fingerprint, folder_fingerprint
from moerge.io.hub import resolve
from moerge.io.safetensors_file import TensorInfo
from moerge.io.source import TensorSource, open_source
from moerge.util.files import atomic_dir, check_output_dir

PREFIX = "base_model.model."
PART = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|ia3_l)"
    r"(\.[A-Za-z0-9_\-]+)??(\.weight)?$"
)
SAVED_MODULE = re.compile(r"\.modules_to_save\.[^.]+")


@dataclass
class Expert:
    """An adapter (or fine-tune) as updates keyed by base tensor name."""

    kind: str  # lora | dora | ia3 | full (a full fine-tune: the tensors it changed)
    updates: dict[str, Update]
    config: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as stored (for export and hashing)
    path: Path | None = None
    # the same updates keyed by the loaded model's parameter names, when the checkpoint stores some
    # otherwise (an MoE base's fused experts): what the mixture runtime attaches to
    model_updates: dict[str, Update] | None = None

    @property
    def in_model(self) -> dict[str, Update]:
        """The updates keyed as the loaded model names its parameters."""
        return self.updates if self.model_updates is None else self.model_updates

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


def parse_adapter(config: dict, tensors: dict[str, torch.Tensor], base: TensorSource, where: str = "adapter",
                  model_dir: str | Path | None = None) -> Expert:
    """Turn PEFT's config and tensors into an Expert, checked against the base's names and shapes.
    ``model_dir``: a folder with the base's config.json, when ``base`` is not such a folder (a
    committed checkpoint), for adapters that name parameters as the loaded model does (MoE bases)."""
    ptype = config.get("peft_type", "LORA")
    if ptype == "DENSE":  # a full fine-tune, stored as the tensors it changed
        for name, t in tensors.items():
            if name not in base or tuple(base.info(name).shape) != tuple(t.shape):
                raise MoergeError(f"{where}: tensor {name} does not fit {base.path}; was it made for another base?")
        return Expert("full", {n: Replace(t) for n, t in tensors.items()}, config, tensors)
    if ptype not in ("LORA", "IA3"):
        raise MoergeError(f"{where}: a {ptype} adapter; moerge reads LoRA, DoRA and (IA)3 adapters")
    kind = "ia3" if ptype == "IA3" else "dora" if config.get("use_dora") else "lora"
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    updates: dict[str, Update] = {}

    def another_base(what: str) -> MoergeError:
        return MoergeError(f"{where}: {what} in {base.path}; was it made for another base?")

    layout = _Layout(base, model_dir)
    for key, t in tensors.items():
        name = SAVED_MODULE.sub("", key[len(PREFIX):] if key.startswith(PREFIX) else key)
        m = PART.match(name)
        if m:  # (an MoE layer's parameters: the factors of nested wrappers, module.base_layer...lora_A)
            parts.setdefault(m["module"], {})[m["part"]] = t
        elif ".base_layer." in name:  # PEFT saves targeted embeddings' own weights: they must be the base's
            own = name.replace(".base_layer.", ".")
            if own not in base or not torch.equal(base.get(own), t.to(base.info(own).dtype)):
                raise another_base(f"the adapter carries its own {own} (resized or retrained embeddings), which differs")
        elif name in base or layout.shape(name) is not None:
            updates[name] = Replace(t)
        else:
            raise another_base(f"adapter tensor {key!r} matches nothing")
    wrapped = _parameter_targets(config, parts, layout, where) if config.get("target_parameters") else {}
    for module, p in parts.items():
        if module in wrapped:  # LoRA on a parameter (PEFT's target_parameters): an MoE stack, or a router's weight
            target, experts, transposed = wrapped[module]
            a, b = p.get("lora_A"), p.get("lora_B")
            r = a.shape[0] // max(experts, 1)
            alpha = _pattern_value(config.get("alpha_pattern"), target, config.get("lora_alpha", r))
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            updates[target] = (StackedLowRank.from_peft(a, b, experts, scale, transposed) if experts
                               else LowRank(a, b, scale))
            continue
        target = module + ".weight"
        if layout.shape(target) is None:
            raise another_base(f"the adapter changes {module!r}, which is missing")
        if "ia3_l" in p:
            updates[target] = Scaling(p["ia3_l"], fan_in_fan_out)
            if p["ia3_l"].shape[-1] == 1 and layout.shape(module + ".bias") is not None:
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
        want = layout.shape(target)
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
    stored = layout.to_checkpoint(updates, another_base)
    return Expert(kind, stored, config, tensors, model_updates=None if stored is updates else updates)


class _Layout:
    """The base as an adapter sees it: PEFT names the model's parameters as the loaded model holds
    them, a checkpoint may store them otherwise (Mixtral's ``block_sparse_moe.experts.3.w1.weight``
    for expert 3's slice of ``mlp.experts.gate_up_proj``). The model class is built (on the meta
    device) only when some name is not the checkpoint's own."""

    def __init__(self, base: TensorSource, model_dir: str | Path | None = None):
        self.base = base
        self.model_dir = model_dir if model_dir is not None else getattr(base, "path", None)
        self._model = False

    @property
    def model(self):
        if self._model is False:
            from moerge.lm.arch import parameter_layout

            path = self.model_dir
            self._model = parameter_layout(path) if path is not None and Path(str(path)).exists() else None
        return self._model

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The tensor's shape in the checkpoint, else in the model class; None when neither has it."""
        if name in self.base:
            return tuple(self.base.info(name).shape)
        return self.model.shapes.get(name) if self.model else None

    def to_checkpoint(self, updates: dict[str, Update], another_base) -> dict[str, Update]:
        """``updates`` keyed by the checkpoint's names (``updates`` itself when they already are): renamed
        tensors take the stored name, a stack's LoRA becomes one plain LoRA per stored piece (each
        expert's gate and up halves share its A and split its B's rows)."""
        if all(n in self.base for n in updates):
            return updates
        renamed, fused = self.model.checkpoint_names(self.base.names()) if self.model else ({}, {})
        out: dict[str, Update] = {}
        for name, u in updates.items():
            if name in self.base:
                out[name] = u
            elif name in renamed:
                out[renamed[name]] = u
            elif name in fused and isinstance(u, StackedLowRank) and not u.transposed:
                for piece in fused[name]:
                    a, b = u.a[piece.expert], u.b[piece.expert]
                    if piece.dim == 1:
                        size = b.shape[0] // piece.count
                        b = b[piece.index * size:(piece.index + 1) * size]
                    else:
                        size = a.shape[1] // piece.count
                        a = a[:, piece.index * size:(piece.index + 1) * size]
                    out[piece.name] = LowRank(a.contiguous(), b.contiguous(), u.scale)
            else:
                raise another_base(f"the adapter changes {name!r}, which the checkpoint does not store "
                                   "(as itself or as pieces moerge knows how to read)")
        for name, u in out.items():
            want = tuple(self.base.info(name).shape)
            if isinstance(u, LowRank) and tuple(u.shape()) != want:
                raise another_base(f"the update for {name} has shape {tuple(u.shape())} but the base tensor is {want}")
        return out


def _parameter_targets(config: dict, parts: dict, layout: "_Layout", where: str) -> dict[str, tuple[str, int, bool]]:
    """Which parameter each parameter wrapper's factors belong to: {saved module name: (parameter name
    as the model holds it, experts in its stack (0 for a matrix), kept (experts, in, out))}.

    PEFT nests one wrapper per targeted parameter of a module, the first declared innermost, and saves
    the wrapper d levels down as ``module`` + ``.base_layer`` × d. The declaration order and the
    stacks' orientation come from the base's model class (``lm.arch.parameter_layout``); a base
    without a config (a committed checkpoint) is matched by the factors' shapes instead."""
    keys = [str(k) for k in config.get("target_parameters") or []]
    model, base = layout.model, layout.base
    found: dict[str, tuple[str, int, bool]] = {}
    for saved in parts:
        owner, depth = saved, 0
        while owner.endswith(".base_layer"):
            owner, depth = owner[: -len(".base_layer")], depth + 1
        known = model is not None and owner in model.params
        names = model.params[owner] if known else sorted(
            n[len(owner) + 1:] for n in base.names() if n.startswith(owner + ".") and "." not in n[len(owner) + 1:])
        targeted = [n for n in names if layout.shape(f"{owner}.{n}") is not None
                    and any(f"{owner}.{n}" == k or f"{owner}.{n}".endswith("." + k) for k in keys)]
        if not targeted and owner != saved and model is not None:
            raise MoergeError(f"{where}: the adapter changes parameters of {owner!r} ({', '.join(keys)}), which "
                              f"{base.path} does not have; was it made for another base?")
        if not targeted and owner != saved:
            raise MoergeError(f"{where}: LoRA on parameters of {owner!r} (PEFT's target_parameters: {', '.join(keys)}), which "
                              f"{base.path} does not store as such; reading it needs the base's config.json beside it "
                              "(an MoE base stores its experts one tensor each)")
        if not targeted:
            continue  # a module targeted as a layer (target_modules)
        a, b = parts[saved].get("lora_A"), parts[saved].get("lora_B")
        if a is None or b is None:
            raise MoergeError(f"{where}: {saved!r} has only one of its A/B matrices; the adapter is incomplete")

        def fits(n: str, transposed: bool) -> bool:
            shape = layout.shape(f"{owner}.{n}")
            if len(shape) not in (2, 3):
                return False
            e = shape[0] if len(shape) == 3 else 1
            out, inp = (shape[-1], shape[-2]) if transposed else (shape[-2], shape[-1])
            return a.shape[0] % e == 0 and a.shape[0] == b.shape[1] and a.shape[1] == inp and b.shape[0] == out

        if known:  # the wrapper d levels down is the (d+1)-th targeted parameter from the last
            if depth >= len(targeted):
                raise MoergeError(f"{where}: {saved!r} is nested deeper than the {len(targeted)} parameter(s) it targets "
                                  f"on {owner!r}; was it made for another base?")
            name, transposed = targeted[len(targeted) - 1 - depth], owner in model.transposed
        else:  # no model class to ask: the one parameter whose shape the factors fit
            fitting = [(n, t) for n in targeted for t in (False, True) if fits(n, t)]
            if len({n for n, _ in fitting}) != 1:
                raise MoergeError(f"{where}: cannot tell which parameter of {owner!r} the factors {saved!r} belong to "
                                  f"({len(fitting)} fit); read the adapter against the base model folder (with its config.json)")
            name, transposed = fitting[0]
        shape = layout.shape(f"{owner}.{name}")
        if not fits(name, transposed):
            raise MoergeError(f"{where}: the factors {tuple(a.shape)}, {tuple(b.shape)} of {owner}.{name} do not fit "
                              f"its shape {shape} in {base.path}; was it made for another base?")
        found[saved] = (f"{owner}.{name}", shape[0] if len(shape) == 3 else 0, transposed)
    return found


def load_finetune(folder: str | Path, base: TensorSource) -> Expert:
    """A full fine-tune as an expert of kind ``full``: the tensors that differ from the base (all must fit it)."""
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
    check_base(folder, base)
    return load_finetune(folder, base)


def load_adapter(folder: str | Path, base: TensorSource) -> Expert:
    """A PEFT adapter folder as an Expert, after the one base check (``check_base``) and a check of
    every tensor's name and shape against ``base``."""
    folder = Path(folder)
    if not folder.exists():
        raise MoergeError(f"{folder}: no such adapter folder")
    config, tensors = read_adapter(folder)
    expert = parse_adapter(config, tensors, base, str(folder))  # names and shapes: the plainest mismatch first
    check_base(folder, base, config)
    expert.path = folder
    return expert


def base_fingerprint(base: TensorSource) -> str:
    """The base's fingerprint, computed once per opened source (a router checks many experts on one base)."""
    fp = getattr(base, "_moerge_fingerprint", None)
    if fp is None:
        fp = fingerprint(base)
        try:
            base._moerge_fingerprint = fp  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return fp


def check_base(folder: Path, base: TensorSource, config: dict | None = None) -> None:
    """The one check, used by every command that applies an expert to a base, that the expert was made
    for this base and not for another of the same shapes (which the shape checks cannot see).

    The evidence, strongest first: the base fingerprint in the expert's card (``expert.json``, written
    by ``moerge expert train``/``extract``/``combine`` and library exports); else PEFT's
    ``base_model_name_or_path`` when it names a local model folder. An adapter with neither (one from
    a hub) is checked by its tensors' names and shapes alone."""
    folder = Path(folder)
    card = read_card(folder)
    made_for = card.get("base_fingerprint")
    if made_for:
        actual = base_fingerprint(base)
        if made_for != actual:
            named = f" ({card['base']})" if card.get("base") else ""
            raise MoergeError(f"{folder}: was made for another base{named}, fingerprint {made_for}, but {base.path} has "
                              f"{actual}; apply it to the base it was made for, or retrain it on this one")
        return
    named = (config or {}).get("base_model_name_or_path")
    if named and Path(named).is_dir() and (Path(named) / "config.json").is_file():
        if Path(named).resolve() == Path(base.path).resolve():
            return

        try:
            theirs = folder_fingerprint(named)
        except MoergeError:
            return  # the folder it names is not a readable model any more: the shape checks decide
        if theirs != base_fingerprint(base):
            raise MoergeError(f"{folder}: its adapter_config.json says it was made for {named}, whose weights differ "
                              f"from {base.path}'s; apply it to {named}, or retrain it on this base")


def write_adapter(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], base: str | Path, *,
                  task: str | None, made_by: str, report: dict, overwrite: bool = False,
                  card_fields: dict | None = None) -> Path:
    """Write a PEFT adapter folder that moerge produced (not trained): the adapter, ``moerge_<made_by>.json``
    (the report of how it was made) and a complete ``expert.json``, whose base fingerprint makes every
    later command refuse it on another base. ``card_fields``: more of the card (task centroids; ``extra``
    entries join ``made_by``). Atomic: the folder appears complete or not at all."""
    from safetensors.torch import save_file

    base_dir = resolve(str(base))
    card = ExpertCard(task=task, adapter="lora", base=str(Path(base_dir).resolve()), base_fingerprint=folder_fingerprint(base_dir),
                      trainable_params=sum(t.numel() for t in tensors.values()), rank=config.get("r"),
                      extra={"made_by": f"moerge expert {made_by}"})
    for k, v in (card_fields or {}).items():
        setattr(card, k, card.extra | v if k == "extra" else v)
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / f"moerge_{made_by}.json").write_text(json.dumps(report, indent=2) + "\n")
        card.adapter_bytes = (tmp / "adapter_model.safetensors").stat().st_size
        card.write(tmp)
    return Path(out_dir)


def combine_folders(adapters: list[str | Path], base: str | Path | None, out_dir: str | Path, *,
                    weights: list[float] | None = None, rank: int | None = None,
                    overwrite: bool = False) -> tuple[dict, dict[str, float]]:
    """Σ wᵢ · adapterᵢ of LoRA folders as one PEFT LoRA folder (exact, or at ``rank``); each input first
    passes the base check. ``base`` None: the one the first adapter's card names. Returns
    (adapter_config, energy kept per module)."""
    check_output_dir(out_dir, overwrite)
    if not adapters:
        raise MoergeError("give the LoRA folders to combine")
    if base is None:
        base = recorded_base(adapters[0], "give that base with --base")
        if base is None:
            raise MoergeError(f"{adapters[0]}: says nothing of the base it was made on (no expert.json naming it); "
                              "give it with --base")
    src = open_source(resolve(str(base)))
    loaded = [load_adapter(a, src) for a in adapters]
    config, tensors, kept = combine_adapters(loaded, weights, rank)

    tasks = [read_card(a).get("task") for a in adapters]
    task = "+".join(t for t in tasks if t) if all(tasks) else None
    write_adapter(out_dir, config, tensors, base, task=task, made_by="combine", overwrite=overwrite,
                  report={"adapters": [str(Path(a).resolve()) for a in adapters], "weights": weights, "rank": rank,
                          "energy_kept": kept})
    return config, kept


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
        """The tensor with the expert applied, kept in float32 when the base is stored narrower: rounding
        it back to bf16 would add a rounding change to every weight, a noise of full rank that the merge
        methods reading each model's change (TIES, DARE, the subspace merges) cannot tell from the
        expert's own; the merge output is rounded once, at the end."""
        t = self.base.get(name)
        update = self.expert.updates.get(name)
        if update is None:
            return t
        exact = t.dtype in (torch.bfloat16, torch.float16)
        return (t.float() + update.delta(t)) if exact and not isinstance(update, Replace) else apply(t, update)
