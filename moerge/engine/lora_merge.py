"""LoRA-native merging: LoRA experts merged into one LoRA expert, not into a dense model.

A merged model is as big as its base; a merged LoRA is as small as an expert, so it goes back into the
library with its lineage and is routed, served and merged again like any other expert. Each layer's
updates are brought into a shared basis where every one of them is exact, merged there by a registered
method, mapped back, and cut to the rank asked for (``experts/lowrank.py`` holds the algebra):

- ``core`` (Panariello et al., NeurIPS 2025, arXiv 2509.17786): the tasks' cores Mₜ = Uᵀ sₜBₜAₜ V in
  the principal bases U of the stacked B's and V of the stacked A's, (Σr × Σr) numbers per layer.
  Methods that see the changes only through orthogonally invariant algebra (sums, SVDs, polar
  factors: linear, task arithmetic, TSV-M, Iso-C, Iso-CTS) give exactly their dense result there;
  elementwise ones (TIES, DARE, ...) select and elect signs among aligned core entries.
- ``knots`` (Stoica et al., ICLR 2025, arXiv 2410.19735): the SVD of the updates side by side,
  [ΔW₁ … ΔW_T] = UΣ[V₁ᵀ … V_Tᵀ]; the method merges the Vₜ (input coordinates × shared directions),
  and the result is UΣV_mergedᵀ.
- ``full``: each update materialised (out × in), merged as the dense merge would, then factorised by a
  truncated SVD: the dense counterpart as a LoRA, at the cost of full matrices.

The rank out is each layer's numerical rank (at most Σ rₜ in the core and KnOTS spaces, where the sum of
the inputs is exact), or ``rank`` when given (the best approximation at that rank; the energy kept is
reported per layer). Only methods whose math is on task vectors are offered: the merged change has no
base to interpolate towards, and data-aware methods need a model's activations, which a LoRA lacks.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.errors import MoergeError, MoergeWarning
from moerge.experts.kinds import LowRank
from moerge.experts.lowrank import check_plain_lora, core_space, factorize, knots_space, peft_lora, refactor

SPACES = ("core", "knots", "full")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear", "sce", "tsv", "iso_c", "iso_cts", "wudi")
# exact in the core space: their result depends on the changes only through orthogonally invariant algebra
ROTATION_INVARIANT = ("linear", "task_arithmetic", "tsv", "iso_c", "iso_cts")
DEFAULT_METHOD = "iso_cts"
# defaults for LoRA experts of an LLM, where they differ from the method's own (the papers' values, tuned on
# ViT task vectors): what ``expert merge --search`` chose on five real SmolLM2-135M experts' validation rows,
# to a step of 0.1 (Iso-C 1.95, Iso-CTS 1.95, TSV-M 0.73, TIES density 0.79; docs/merging.md has the curves:
# Iso-CTS and TIES were flat within noise, TSV-M fell to 0-1 % from 1.3 up). ``--param`` overrides them;
# ``--search`` chooses for your experts (and for the methods not searched here, which keep their own).
LORA_DEFAULTS: dict[str, dict[str, float]] = {
    "iso_c": {"alpha": 2.0}, "iso_cts": {"alpha": 2.0}, "tsv": {"alpha": 0.7}, "ties": {"density": 0.8},
}


@dataclass
class LoraMerge:
    """A merged LoRA: the PEFT adapter (config and tensors), per layer the rank written and the share
    of the merged change's energy that rank keeps, and the parameters as resolved (defaults filled)."""

    config: dict
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    kept: dict[str, float]
    method: str
    space: str
    params: dict[str, Any]
    rank: int | None
    seconds: float = 0.0
    report: dict = field(default_factory=dict)
    updates: dict[str, LowRank] = field(default_factory=dict)  # the merged factors by base tensor name

    @property
    def lowest_kept(self) -> float:
        return min(self.kept.values()) if self.kept else 1.0


def lora_method(name: str):
    """The registered method ``name``, if LoRA experts can be merged with it; else one line naming those that can."""
    import difflib

    from moerge.methods.registry import get, names

    if name not in names():
        near = difflib.get_close_matches(name, METHODS, n=1)
        raise MoergeError(f"unknown merge method {name!r}{f' (did you mean {near[0]}?)' if near else ''}; LoRA experts "
                          f"merge with one of: {', '.join(METHODS)}")
    if name not in METHODS:
        raise MoergeError(f"{name!r} cannot merge LoRA experts into a LoRA (it needs a base model to interpolate "
                          f"towards, or data); use one of: {', '.join(METHODS)} (or merge into a model with `moerge merge`)")
    return get(name)


def resolve_params(method, params: dict | None, n: int) -> tuple[dict, dict]:
    """(shared, per_input) values for ``n`` inputs, checked as a recipe's are: defaults filled (LoRA
    experts' own, ``LORA_DEFAULTS``, else the method's; a required per-input weight defaults to 1), a scalar given for a per-input parameter used for every
    input, a list checked for length; an unknown name is one line naming those the method takes."""
    from moerge.engine.recipe import check_value

    params = LORA_DEFAULTS.get(method.name, {}) | dict(params or {})
    unknown = [k for k in params if method.param(k) is None or method.param(k).for_stats]
    if unknown:
        takes = ", ".join(p.name for p in method.params if not p.for_stats) or "no parameters"
        raise MoergeError(f"{method.name}: no parameter {unknown[0]!r}; it takes {takes}")
    shared, per_input = {}, {}
    for p in method.params:
        if p.for_stats or p.name == "int8_mask":
            continue
        value = params.get(p.name, 1.0 if (p.required and p.name == "weight") else p.default)
        if p.required and value is p.default:
            raise MoergeError(f"{method.name}: give its parameter {p.name!r}")
        values = value if isinstance(value, (list, tuple)) else None
        if values is not None and not p.per_input:
            raise MoergeError(f"{method.name}: {p.name} takes one value, not a list")
        if p.per_input and values is not None and len(values) != n:
            raise MoergeError(f"{method.name}: {len(values)} values of {p.name} for {n} experts; give one per expert (or one for all)")
        try:
            if p.per_input:
                per_input[p.name] = [check_value(p, v) for v in (values if values is not None else [value] * n)]
            else:
                shared[p.name] = check_value(p, value)
        except ValueError as e:
            raise MoergeError(f"{method.name}: {p.name} {e}") from None
    return shared, per_input


def merge_updates(updates: list[LowRank], method, shared: dict, per_input: dict, *, space: str = "core",
                  name: str = "", rank: int | None = None, generator: torch.Generator | None = None) -> tuple[LowRank, float]:
    """One layer: the updates of the experts that have it merged by ``method`` in ``space``, as one
    LowRank of ``rank`` (None: the result's numerical rank), and the share of the merged change's energy
    kept. ``per_input`` lists are aligned with ``updates``."""
    kwargs = dict(shared) | per_input
    if method.extra.get("tensor_name"):
        kwargs["name"] = name
    out_shape = (updates[0].b.shape[0], updates[0].a.shape[1])  # LoRA orientation (out × in)
    if method.extra.get("layer_rank"):
        kwargs["layer_rank"] = min(out_shape)
    transpose = updates[0].transpose

    def run(tensors: list[torch.Tensor]) -> torch.Tensor:
        zero = torch.zeros_like(tensors[0])
        return method(zero, tensors, generator=generator, **kwargs).double()

    if space == "core":
        left, right, cores = core_space(updates)
        merged = LowRank(right.T, left @ run(cores), 1.0, transpose)
    elif space == "knots":
        us, vs = knots_space(updates)
        merged = LowRank(run(vs).T, us, 1.0, transpose)
    elif space == "full":
        dense = run([u.b.double() @ u.a.double() * u.scale for u in updates])
        a, b, kept = factorize(dense, rank or sum(u.rank for u in updates))
        return LowRank(a.float(), b.float(), 1.0, transpose), kept
    else:
        raise MoergeError(f"space {space!r}: choose one of {', '.join(SPACES)}")
    if not bool(torch.isfinite(merged.b).all()):
        raise MoergeError(f"{method.name}: the merged change of {name or 'a layer'} is not finite; check the method's parameters")
    return refactor(merged, rank)


def merge_lora(experts: list, method: str = DEFAULT_METHOD, params: dict | None = None, *, space: str = "core",
               rank: int | None = None, seed: int = 0) -> LoraMerge:
    """LoRA ``experts`` (``Expert`` objects of one base) merged into one LoRA by ``method`` in ``space``.

    ``params`` are the method's, as in a recipe (per-expert ones as a list, or one value for all);
    ``rank``: the rank of every layer written (None: each layer's numerical rank). Random methods draw
    per layer from ``seed``, so a run repeats exactly."""
    from moerge.engine.plan import tensor_seed

    t0 = time.perf_counter()
    if space not in SPACES:
        raise MoergeError(f"space {space!r}: choose one of {', '.join(SPACES)}")
    if rank is not None and rank < 1:
        raise MoergeError(f"rank {rank}: give a rank of at least 1 (or none, for each layer's exact rank)")
    if not experts:
        raise MoergeError("give the LoRA experts to merge")
    m = lora_method(method)
    if len(experts) < m.min_inputs or (m.max_inputs is not None and len(experts) > m.max_inputs):
        raise MoergeError(f"{method}: cannot merge {len(experts)} experts")
    check_plain_lora(experts, what="merge")
    shared, per_input = resolve_params(m, params, len(experts))
    merged, kept = {}, {}
    for target in sorted({t for e in experts for t in e.updates}):
        have = [i for i, e in enumerate(experts) if target in e.updates]
        updates = [experts[i].updates[target] for i in have]
        if len({(u.shape(), u.transpose) for u in updates}) > 1:
            raise MoergeError(f"{target}: the experts' LoRA factors disagree in shape; were they made on one base?")
        gen = torch.Generator().manual_seed(tensor_seed(seed, target)) if m.random else None
        merged[target], kept[target] = merge_updates(
            updates, m, shared, {k: [v[i] for i in have] for k, v in per_input.items()},
            space=space, name=target, rank=rank, generator=gen)
    most = max((sum(experts[i].updates[t].rank for i in range(len(experts)) if t in experts[i].updates)
                for t in merged), default=0)
    if rank is not None and space != "full" and rank > most:
        warnings.warn(f"rank {rank}: above the experts' combined rank ({most}, the most any layer of the {space} space "
                      "holds); each layer is written at its exact rank instead", MoergeWarning, stacklevel=2)
    config, tensors = peft_lora(experts[0].config, merged)
    return LoraMerge(config, tensors, {t: u.rank for t, u in merged.items()}, kept, method, space,
                     shared | per_input, rank, time.perf_counter() - t0, updates=merged)


def refs_of(experts) -> list[str]:
    """The experts to merge as references (one folder or ``library://`` ref given alone is a list of one)."""
    return [str(experts)] if isinstance(experts, (str, os.PathLike)) else [str(e) for e in experts]


def open_inputs(refs: list[str], base, library):
    """(experts, their cards, the base folder, what each ref pins): folders are loaded against the
    base (their card's, or ``base``), ``library://NAME[@V]`` refs from the library, on one base version."""
    from moerge.experts.card import read_card, recorded_base
    from moerge.experts.peft_format import load_adapter
    from moerge.io.hub import resolve
    from moerge.io.source import open_source

    lib = None
    experts, cards, pins, base_dirs = [], [], [], set()
    folders = [r for r in refs if not str(r).startswith("library://")]
    if len(folders) < len(refs):
        from moerge.library.store import Library

        lib = Library.open(library)
    if base is None and folders:
        base = recorded_base(folders[0], "give that base with --base")
        if base is None and lib is None:
            raise MoergeError(f"{folders[0]}: says nothing of the base it was made on (no expert.json naming it); "
                              "give it with --base")
    src = None
    for ref in refs:
        ref = str(ref)
        if ref.startswith("library://"):
            entry = lib.get(ref.removeprefix("library://"))
            experts.append(lib.load(entry.ref))
            cards.append(dict(entry.card))
            pins.append({"ref": f"library://{entry.ref}", "digest": entry.digest, "task": entry.task,
                         "data": entry.card.get("data")})
            base_dirs.add(str(lib.base(entry.base_version).path))
        else:
            if (Path(ref) / "config.json").is_file() and not (Path(ref) / "adapter_config.json").is_file():
                raise MoergeError(f"{ref}: a full fine-tune, not a LoRA adapter; merge fine-tunes into a model with "
                                  "`moerge merge` (or extract a LoRA first: `moerge expert extract`)")
            if src is None:
                src = open_source(resolve(str(base if base is not None else lib.base().path)))
            e = load_adapter(ref, src)
            experts.append(e)
            cards.append(read_card(ref))
            pins.append({"ref": str(Path(ref).resolve()), "digest": e.digest(), "task": cards[-1].get("task"),
                         "data": cards[-1].get("data")})
            base_dirs.add(str(Path(resolve(str(base if base is not None else lib.base().path))).resolve()))
    if len(base_dirs) > 1:
        raise MoergeError(f"the experts were made on different bases ({', '.join(sorted(base_dirs))}); merge experts of one base")
    if len(refs) < 2:
        raise MoergeError(f"give two or more LoRA experts to merge (one was given: {refs[0]}); a single expert "
                          "merged alone is only rescaled")
    first: dict[str, str] = {}
    for pin in pins:
        if pin["digest"] in first:
            raise MoergeError(f"{pin['ref']} and {first[pin['digest']]} are the same expert (the same tensors); give each once")
        first[pin["digest"]] = pin["ref"]
    return experts, cards, next(iter(base_dirs)), pins


def merge_lora_folders(refs: list, out_dir: str | os.PathLike, *, method: str = DEFAULT_METHOD, params: dict | None = None,
                       space: str = "core", rank: int | None = None, seed: int = 0, base=None, library=None,
                       task: str | None = None, overwrite: bool = False, search: dict | None = None) -> LoraMerge:
    """Merge LoRA experts (folders, or ``library://NAME[@V]``) into the PEFT LoRA folder ``out_dir``,
    written atomically with a complete ``expert.json``: its base, the task (``task``, else the inputs'
    joined by ``+``), the inputs' task centroids (so routers find it for any of their tasks) and its
    lineage (``merged_from``: each input's reference and content digest, the method, parameters, space
    and rank), plus ``moerge_merge.json`` with the energy kept per layer and the recipe of the dense
    counterpart (the same method through ``moerge merge``), for comparison. ``search``: how the parameters
    were chosen (``search.lora.LoraSearch.record``), kept in the lineage."""
    from moerge.experts.embed import merged_centroids
    from moerge.experts.peft_format import write_adapter
    from moerge.io.fingerprint import folder_fingerprint
    from moerge.util.files import check_output_dir

    check_output_dir(out_dir, overwrite, inputs=[r for r in refs_of(refs) if not r.startswith("library://")])
    if not refs:
        raise MoergeError("give the LoRA experts to merge (folders, or library://NAME)")
    experts, cards, base_dir, pins = open_inputs(refs_of(refs), base, library)
    res = merge_lora(experts, method, params, space=space, rank=rank, seed=seed)
    tasks = [c.get("task") for c in cards]  # a merged input's task is its parts'
    task = task or ("+".join(dict.fromkeys(p for t in tasks for p in t.split("+"))) if all(tasks) else None)
    lineage = {"method": method, "space": space, "params": res.params, "rank": rank, "seed": seed, "inputs": pins}
    if search is not None:
        lineage["search"] = search
    res.report = {**lineage, "seconds": round(res.seconds, 3), "ranks": res.ranks, "energy_kept": res.kept,
                  "dense_recipe": dense_recipe(pins, base_dir, method, res.params)}
    write_adapter(out_dir, res.config, res.tensors, base_dir, task=task, made_by="merge", overwrite=overwrite,
                  report=res.report, card_fields=merged_centroids(cards, folder_fingerprint(base_dir))
                  | {"extra": {"merged_from": lineage}})
    return res


def dense_recipe(pins: list[dict], base_dir: str, method: str, params: dict) -> str:
    """The recipe that merges the same experts by the same method into a model (``moerge merge``)."""
    import yaml

    models = []
    for i, p in enumerate(pins):
        ref = p["ref"] if p["ref"].startswith("library://") else {"model": base_dir, "lora": p["ref"]}
        entry = {"model": ref}
        per = {k: v[i] for k, v in params.items() if isinstance(v, list)}
        if per:
            entry["parameters"] = per
        models.append(entry)
    shared = {k: v for k, v in params.items() if not isinstance(v, list)}
    recipe = {"merge_method": method, "base_model": base_dir, "models": models}
    if shared:
        recipe["parameters"] = shared
    return yaml.safe_dump(recipe, sort_keys=False)
