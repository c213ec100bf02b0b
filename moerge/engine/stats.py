"""Statistics of each input model on its own data, for the data-aware merge methods (Fisher, RegMean).

A method that declares ``stats`` (``methods/fisher.py``, ``methods/regmean.py``) stays a pure tensor
function: before the executor streams the plan, this step runs every non-base input as a transformers
model on examples of what it was tuned on and saves, per tensor, what the method weighs it by:

- ``fisher``: the diagonal empirical Fisher, the mean over examples of the squared gradient of the
  example's log-likelihood (its completion tokens given the prompt), one example at a time as Matena &
  Raffel define it (the square of a batch's gradient is not the mean of squares);
- ``gram``: per linear layer the Gram matrix XᵀX of its inputs over every non-padding token, divided
  by the number of tokens, so a model's weight in the merge does not grow with its data. Layers fed
  the same input (q, k and v; gate and up) share one matrix in the file.

Which data: the model's ``data`` parameter in the recipe (a JSONL file of prompt/completion rows, a
built-in task name, or several comma-separated), else the training data its expert card names (an
expert trained by moerge, a library expert). Statistics are cached in ``$MOERGE_CACHE/stats`` under
the hash of the model's tensors, the examples and the settings, so a second merge of the same experts
(another weight, another method of the same kind) reuses them. Gram matrices are computed layer by
layer (``layerwise.py``: one decoder layer's weights in memory at a time, each layer's matrices
written when it is done); the Fisher needs the whole model, in float32 with its gradients (twice the
model's size), one model at a time.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moerge.engine.dense import load_dense, load_tokenizer
from moerge.engine.layerwise import LayerwiseModel
from moerge.errors import MoergeError
from moerge.experts.card import ExpertCard
from moerge.io.writer import ShardedWriter
from moerge.lm import device as devices
from moerge.lm.arch import as_stored
from moerge.lm.batching import collate, completion_loss, encode
from moerge.lm.device import model_device, named
from moerge.lm.precision import compute_dtype, model_kwargs, stored_dtype
from moerge.tasks.data import is_user_task
from moerge.tasks.training_data import training_rows
from moerge.util.files import atomic_file, cache_dir

VERSION = 1  # bump when what a statistic means changes, so old cache files are not reused


@dataclass
class Stats:
    """One model's statistics, read from their cache file as the merge asks for them (memory-mapped:
    six real models' Gram matrices are gigabytes): ``get(name)`` is the tensor for a weight of that
    name, or None."""

    kind: str
    aliases: dict[str, str]  # weight name -> the name its (shared) statistic is stored under
    layouts: dict[str, str]  # gram only: "out_in" (nn.Linear) or "in_out" (GPT-2's Conv1D)
    scale: float  # fisher: the mean of the Fisher over every parameter (for normalisation); gram: 1
    examples: int
    path: Path
    names: frozenset = frozenset()

    def get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        key = self.aliases.get(name, name)
        if key not in self.names:
            return None
        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(key)

    def layout(self, name: str) -> str | None:
        return self.layouts.get(name)


def cache_root() -> Path:
    return cache_dir() / "stats"


# ----------------------------------------------------------------------------------------- data
def rows_for(model, data: str | None, n: int, seed: int = 0, why: str = "") -> tuple[list, str]:
    """(examples, what they are) for one input model: ``data`` as the recipe gives it, else the
    training data of the model's expert card."""
    from moerge.tasks import examples, mixture

    if data:
        if is_user_task(data) or Path(data).exists():
            if not Path(data).is_file() or not is_user_task(data):
                why = "" if Path(data).exists() else " (no such file)"
                raise MoergeError(f"{model.ref}: data {data} is not a .jsonl file{why}; give a JSONL of prompt/completion rows or "
                                  "a built-in task name (`moerge tasks list`)")
            rows = examples(data, "train", n, seed)
        else:
            names = [t.strip() for t in data.split(",") if t.strip()]
            rows = mixture(names, "train", max(1, n // len(names)), seed)
        return rows[:n], data
    card = model.expert_card()
    if card.get("data"):

        try:
            rows = training_rows(ExpertCard(**{k: v for k, v in card.items() if k in ExpertCard.__dataclass_fields__}), n, seed)
        except MoergeError as e:
            raise MoergeError(f"{model.ref}: {e}; or add `parameters: {{data: FILE.jsonl}}` to it in the recipe") from None
        return rows[:n], card["data"]
    raise MoergeError(f"{model.ref}: {why or 'this merge'} needs examples of what this model was tuned on, and it has no "
                      "expert card naming its training data; add `parameters: {data: FILE.jsonl}` (prompt/completion "
                      "rows, or a built-in task name) to it in the recipe")


def _rows_digest(rows) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.prompt, r.completion]).encode())
    return h.hexdigest()


def _digest(names, get) -> str:
    """The hash of a model's tensors (names and float32 bytes, ``get(name)`` one at a time, by name):
    the statistics' cache key, whatever path, adapter or library reference the model was reached by."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = get(name)
        h.update(name.encode())
        h.update(memoryview(t.detach().to(torch.float32).reshape(-1).contiguous().cpu().view(torch.uint8).numpy()))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- math
def fisher(model: torch.nn.Module, tokenizer, rows) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher per parameter: the mean over ``rows`` of (∂ log p(completion | prompt) / ∂θ)²,
    accumulated in float32. A bf16 model gives bf16 gradients, squared into the float32 sums: on a
    135M model the per-example cost was mostly memory traffic over every parameter (zeroing, casting
    and accumulating ``.grad``), which fresh gradients from ``autograd.grad`` in the model's own dtype avoid."""
    params = dict(model.named_parameters())  # tied weights appear once, under the input embedding's name
    names, weights = list(params), list(params.values())
    for p in weights:
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    model.eval()  # no dropout: the Fisher of the model as it predicts
    where = model_device(model)
    for ids in encode(tokenizer, rows):
        batch = {k: devices.send(v, where) for k, v in collate([ids], tokenizer.pad_token_id).items()}
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        loss = completion_loss(model, batch).float() * n_tokens  # -log p(y | x): the mean times the tokens
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                acc[n].addcmul_(g, g)
    for p in weights:
        p.requires_grad_(False)
    return {n: a.div_(len(rows)).cpu() for n, a in acc.items()}


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Checkpoint names that are another parameter (a tied LM head): name -> the parameter's name."""
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    return {n: by_id[id(t)] for n, t in model.state_dict(keep_vars=True).items() if n not in params and id(t) in by_id}


def _linear_layers(model: torch.nn.Module):
    """(weight name, module, layout) of every linear layer whose weight is its own (a head tied to the
    input embedding is averaged with the embedding, not solved for)."""
    from transformers.pytorch_utils import Conv1D

    emb = model.get_input_embeddings()
    tied = emb.weight if emb is not None else None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight is not tied:
            yield f"{name}.weight", mod, "out_in"
        elif isinstance(mod, Conv1D):
            yield f"{name}.weight", mod, "in_out"


@torch.no_grad()
def gram(lw, tokenizer, rows, put, batch_size: int = 8) -> tuple[dict, dict]:
    """(aliases, layouts) of a model run layer by layer (``layerwise.LayerwiseModel``); ``put`` gets
    each decoder layer's Gram matrices as soon as the layer is done: per linear layer the mean over
    non-padding tokens of x xᵀ of its input x, accumulated in float64. Layers reading the very same
    tensor (q, k and v) share one matrix, recorded in the aliases."""
    layers = {w: (mod, layout) for w, mod, layout in _linear_layers(lw.model)}
    encoded = encode(tokenizer, rows)
    batches = [collate(encoded[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(encoded), batch_size)]
    masks = [devices.send(b["attention_mask"].reshape(-1).bool(), lw.device) for b in batches]
    tokens = max(1, sum(int(m.sum()) for m in masks))
    aliases: dict[str, str] = {}
    grams: dict[str, torch.Tensor] = {}
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # id of an input in the first batch -> (first layer that read it, it)
    hooks: list = []
    at = [0]  # the batch running

    def hook_for(wname: str):
        def hook(module, args):
            x = args[0]
            if at[0] == 0:  # the very same tensor (held, so its id is not reused) read by several layers
                if id(x) in seen and seen[id(x)][1] is x:
                    aliases[wname] = seen[id(x)][0]
                    return
                seen[id(x)] = (wname, x)
            elif wname in aliases:
                return
            flat = x.reshape(-1, x.shape[-1])[masks[at[0]]].double()
            g = flat.T @ flat
            grams[wname] = grams[wname].add_(g) if wname in grams else g
        return hook

    def finish() -> None:
        for h in hooks:
            h.remove()
        hooks.clear()
        seen.clear()
        if grams:
            put({w: g.div_(tokens).float().cpu() for w, g in grams.items()})
        grams.clear()

    inside = lw.prefix + "."

    def visit(prefix: str, module, b: int) -> None:
        at[0] = b
        if b == 0:
            finish()
            names = [w for w in layers if (w.startswith(prefix + ".") if prefix else not w.startswith(inside))]
            hooks.extend(layers[w][0].register_forward_pre_hook(hook_for(w)) for w in names)

    outer = any(not w.startswith(inside) for w in layers)  # an untied head: the tail runs too
    lw.run(batches, visit, tail=outer)
    finish()
    return aliases, {w: layout for w, (_, layout) in layers.items()}


# ----------------------------------------------------------------------------------------- files
def _save(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"moerge": json.dumps(meta)})


def _save_layers(path: Path, compute_into, meta: dict) -> None:
    """A statistics file written from parts: ``compute_into(put)`` hands ``put`` a dict of tensors
    at a time (a layer's) and returns (aliases, layouts); each part goes to disk at once, and the
    file is assembled from them, so the statistics are never all in memory."""
    import shutil
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".parts-", dir=path.parent))
    try:
        parts: list[Path] = []

        def put(tensors: dict) -> None:
            parts.append(tmp / f"{len(parts):05d}.safetensors")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(parts[-1]))

        aliases, layouts = compute_into(put)
        meta = {**meta, "aliases": aliases, "layouts": layouts}
        shapes = []
        for part in parts:
            with safe_open(str(part), "pt") as f:
                shapes += [(k, tuple(f.get_slice(k).get_shape()), torch.float32) for k in f.keys()]
        writer = ShardedWriter(tmp / "out", shapes, max_shard_bytes=1 << 62, metadata={"moerge": json.dumps(meta)})
        for part in parts:
            with safe_open(str(part), "pt") as f:
                for k in f.keys():
                    writer.write(k, f.get_tensor(k))
            part.unlink()
        (writer.commit() / "model.safetensors").replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path) -> Stats:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {})["moerge"])
        names = frozenset(f.keys())  # opening checks the header against the file's size: a truncated file fails here
    return Stats(meta["kind"], meta.get("aliases", {}), meta.get("layouts", {}), float(meta.get("scale", 1.0)),
                 int(meta["examples"]), path, names)


def compute(model_ref, kind: str, rows: list, described: str, progress: bool = False) -> Stats:
    """One input model's statistics of ``kind`` ("fisher" or "gram") on ``rows`` (``rows_for``), from
    the cache when the same model, examples and settings were seen before. Gram matrices are computed
    layer by layer (``layerwise``: one decoder layer's weights in memory at a time) and written as each
    layer finishes; the Fisher needs a backward through the whole model, so it loads it whole."""
    if kind not in ("fisher", "gram"):
        raise MoergeError(f"unknown statistic {kind!r}")
    start = time.perf_counter()
    where = named()  # as merges: on the device the user named, else the CPU
    tok = load_tokenizer(model_ref, "its statistics")
    mixed = False
    if kind == "fisher":

        # in bf16 where the model is a bf16 checkpoint and this CPU multiplies bf16 natively (moerge.lm.precision),
        # the squares summed in float32
        dtype = compute_dtype(stored_dtype(model_ref.config))
        mixed = dtype == torch.bfloat16
        model = load_dense(model_ref, dtype, **model_kwargs(dtype))
        sd = model.state_dict()
        digest = _digest(sd, sd.__getitem__)  # of the weights as read, before they move: one cache key on every device
        devices.send_module(model, where)
    else:
        model = LayerwiseModel(model_ref, where if where is None or where.type != "mps" else None)  # float64 sums: not on MPS
        sd = model.model.state_dict(keep_vars=True)
        digest = _digest(sd, lambda n: model.tensor(n) if sd[n].is_meta else sd[n])
    key = hashlib.sha256(json.dumps({"v": VERSION, "kind": kind, "model": digest, "rows": _rows_digest(rows),
                                     **({"mixed": True} if mixed else {})},
                                    sort_keys=True).encode()).hexdigest()
    path = cache_root() / f"{kind}-{key[:40]}.safetensors"
    if path.is_file():
        try:
            stats = _load(path)
            _say(progress, f"statistics: {kind} of {model_ref.ref} on {len(rows)} examples of {described}: cached ({path})")
            return stats
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    meta = {"kind": kind, "version": VERSION, "model": model_ref.pinned, "data": described, "examples": len(rows), "scale": 1.0,
            **({"dtype": "bfloat16"} if mixed else {})}
    if kind == "fisher":
        # keyed as the checkpoint stores its tensors (an MoE base's stacked experts, one tensor each), as merges read them
        stored = list(model_ref.source.names())
        tensors = as_stored(model.config.model_type, fisher(model, tok, rows), stored)
        total = sum(float(t.sum()) for t in tensors.values())
        meta.update(aliases=tied_names(model), layouts={},
                    scale=total / max(1, sum(t.numel() for t in tensors.values())))
        _save(path, tensors, meta)
    else:
        _save_layers(path, lambda put: gram(model, tok, rows, put), meta)
    _say(progress, f"statistics: {kind} of {model_ref.ref} on {len(rows)} examples of {described}: "
                   f"{time.perf_counter() - start:.0f} s (cached in {path})")
    return _load(path)


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)


def requested(plan) -> tuple[dict[int, str | None], int]:
    """(each merged input's ``data`` as the recipe gives it, ``num_examples``) of a data-aware plan; a
    model given different data for different tensors, or several example counts, is refused."""
    wanted: dict[int, set] = {}
    counts: set = set()
    for task in plan.tasks:
        if not task.floating:
            continue
        for (i, _), d in zip(task.inputs, task.per_input.get("data") or [None] * len(task.inputs)):
            wanted.setdefault(i, set()).add(d)
        counts.add(task.shared.get("num_examples"))
    if len(counts) > 1:
        raise MoergeError(f"{plan.method.name}: num_examples must be one number for the whole merge, got {sorted(counts)}")
    for i, datas in wanted.items():
        if len(datas) > 1:
            raise MoergeError(f"{plan.models[i].ref}: gets different data for different tensors ({', '.join(map(str, datas))}); "
                              f"{plan.method.name} computes one set of statistics per model: give data without filters")
    return {i: datas.pop() for i, datas in sorted(wanted.items())}, int(counts.pop() or 256) if counts else 256


def gather(plan, progress: bool = False) -> list[Stats | None]:
    """The statistics the plan's method needs, one entry per opened model (None for those that are
    not merged inputs: the base). Each model's ``data`` and the shared ``num_examples`` come from the
    recipe as planned (``requested``)."""
    method = plan.method
    wanted, n = requested(plan)
    data: dict[int, tuple[list, str]] = {}
    for i, d in wanted.items():  # every model's examples first: a missing one is refused before any work
        model = plan.models[i]
        rows, described = rows_for(model, d, n, plan.recipe.seed or 0, f"merge_method {method.name}")
        if not rows:
            raise MoergeError(f"{model.ref}: its data {described} gave no examples; give more rows")
        data[i] = rows, described
    out: list[Stats | None] = [None] * len(plan.models)
    for i, (rows, described) in data.items():
        out[i] = compute(plan.models[i], method.stats, rows, described, progress)
    return out


def ensure(plan, progress: bool = False) -> None:
    """Gather a data-aware plan's statistics unless it has them (a search hands them over once)."""
    if plan.method.stats and plan.stats is None:
        plan.stats = gather(plan, progress)
