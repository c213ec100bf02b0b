"""Plan and write an MoE checkpoint from dense models (mergekit-moe's job): Mixtral, DeepSeek MoE, Qwen
MoE (Qwen2-MoE) or Qwen3 MoE, chosen as mergekit chooses (moerge/moe/arch.py).

Planning opens every input lazily (headers only) and checks names, shapes and architectures; the run
computes the router rows first (the only step that reads more than one tensor at a time: ``hidden``
runs the base model), then streams every output tensor through the ShardedWriter one at a time (Qwen3
MoE's fused experts: one layer's MLPs at a time), into a hidden folder renamed into place when complete.

Every output keeps the base's embeddings, attention, norms and LM head under their own names; each
expert's ``mlp.{gate,up,down}_proj`` goes under the architecture's expert names (Mixtral:
``block_sparse_moe.experts.E.{w1,w3,w2}``), a shared expert under its shared name, and each layer gets a
router of (experts x hidden) rows.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.engine.card import TOKENIZER_FILES
from moerge.engine.dense import load_dense
from moerge.engine.executor import MergeResult
from moerge.engine.plan import (
    DTYPES,
    Model,
    _human,
    open_model,
    tensor_nbytes,
    tensor_seed,
)
from moerge.engine.recipe import _line_map
from moerge.errors import MoergeError
from moerge.io.fingerprint import fingerprint
from moerge.io.writer import ShardedWriter, parse_size
from moerge.library import Library
from moerge.moe import router
from moerge.moe.arch import PROJS, Arch, fused_experts, select
from moerge.moe.config import PROMPT_MODES, MoEConfig, _at, same_experts_error
from moerge.util.progress import ProgressLog
from moerge.version import __version__

LAYER_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.")
SKIP = re.compile(r"rotary_emb\.inv_freq$")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SHARED = -1  # Task.expert of the shared expert


@dataclass
class Task:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # copy | expert | fused | router | shared_gate | zeros
    model: int = 0  # index into MoEPlan.models
    src: str = ""  # source tensor name (expert: the dense MLP tensor; fused: its projection)
    expert: int = 0  # index into config.experts, or SHARED
    layer: int = 0

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass
class MoEPlan:
    config: MoEConfig
    arch: Arch
    models: list[Model]  # distinct inputs: the base first
    expert_models: list[int]  # per expert: its index in models
    shared_model: int | None  # the shared expert's index in models
    tasks: list[Task]
    out_dtype: torch.dtype | None
    router_dtype: torch.dtype
    num_layers: int
    hidden: int
    out_config: dict
    notes: list[str] = field(default_factory=list)
    library_rows: torch.Tensor | None = None  # gate_mode library: (gated experts, hidden) task centroids

    @property
    def base(self) -> Model:
        return self.models[0]

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    @property
    def gated(self) -> list:
        """The experts that get router rows: the routed ones, then a gated shared expert."""
        shared = self.config.shared_experts or []
        return list(self.config.experts) + (shared if self.arch.gates_shared(shared) else [])

    def expert_cfg(self, i: int):
        return self.config.shared_experts[0] if i == SHARED else self.config.experts[i]

    def summary(self) -> str:
        c = self.config
        kinds = {k: sum(t.kind == k for t in self.tasks) for k in ("copy", "expert", "fused", "router", "shared_gate", "zeros")}
        lines = [
            f"method: moe ({self.arch.name} output, gate_mode {c.gate_mode}" + (f", seed {c.seed}" if c.gate_mode in ("random", "uniform_random") else "") + ")",
            f"base: {self.base.pinned}",
            "experts: " + ", ".join(self.models[i].pinned for i in self.expert_models),
        ]
        if self.shared_model is not None:
            lines.append(f"shared expert: {self.models[self.shared_model].pinned}"
                         + (" (gated)" if self.arch.gates_shared(c.shared_experts or []) else ""))
        lines += [
            f"experts per token: {c.experts_per_token} of {len(c.experts)}",
            f"output tensors: {len(self.tasks)}  ({kinds['copy']} from the base, {kinds['expert'] + kinds['fused']} expert "
            f"MLP, {kinds['router'] + kinds['shared_gate']} router" + (f", {kinds['zeros']} zero q/k/v biases" if kinds["zeros"]
                                                                     else "") + ")",
            f"output size: {_human(self.output_bytes)}  (dtype {', '.join(sorted({DTYPE_NAMES.get(t.dtype, str(t.dtype)) for t in self.tasks}))})",
            f"layers: {self.num_layers}",
        ]
        return "\n".join(lines + self.notes)


def _where(cfg: MoEConfig, path: tuple) -> str:
    lines = _line_map(cfg._text) if cfg._text else {}
    return _at(cfg._source, lines, path)


def _open(cfg: MoEConfig, ref: str, path: tuple, library, cache: dict[str, Model]) -> Model:
    if ref not in cache:
        try:
            cache[ref] = open_model(ref, library)
        except MoergeError as e:
            raise MoergeError(f"{_where(cfg, path)}: {e}") from None
    return cache[ref]


def _model_type(m: Model) -> str | None:
    t = m.config.get("model_type")
    return t if isinstance(t, str) else None


def build_moe_plan(cfg: MoEConfig, library=None, allow_same: bool = False) -> MoEPlan:
    if not allow_same:
        e = same_experts_error(cfg, cfg._source, cfg._text)
        if e is not None:
            raise e
    cache: dict[str, Model] = {}
    base = _open(cfg, cfg.base_model, ("base_model",), library, cache)
    btype = _model_type(base)
    shared = cfg.shared_experts or []
    arch, why = select(cfg.architecture, btype, shared, cfg.gate_mode)
    if arch is None:
        key = ("architecture",) if cfg.architecture else ("shared_experts",) if shared else ("base_model",)
        raise MoergeError(f"{_where(cfg, key)}: {why}")
    if base.config.get("mlp_bias"):
        raise MoergeError(f"{_where(cfg, ('base_model',))}: has mlp_bias: true in config.json, which {arch.name} experts "
                          "have no place for; use models without MLP biases")
    if base.config.get("attention_bias") and btype in ("llama", "mistral"):
        raise MoergeError(f"{_where(cfg, ('base_model',))}: has attention_bias: true in config.json, which {arch.name} "
                          "has no place for; use models without biases")
    layers = base.num_layers()
    names = base.source.names()
    if "model.embed_tokens.weight" not in base.source:
        raise MoergeError(f"{_where(cfg, ('base_model',))}: has no model.embed_tokens.weight; is it a "
                          f"{btype or 'Llama'} checkpoint?")
    hidden = base.source.info("model.embed_tokens.weight").shape[1]
    refs: list[str] = [base.ref]

    def member(ref: str, path: tuple) -> int:
        m = _open(cfg, ref, path, library, cache)
        if m.ref not in refs:
            refs.append(m.ref)
        if _model_type(m) != btype:
            raise MoergeError(f"{_where(cfg, path)}: is a {_model_type(m) or 'model without a model_type'} but the base is "
                              f"{btype}; {arch.name} output needs every input to have the base's architecture")
        if m.num_layers() != layers:
            raise MoergeError(f"{_where(cfg, path)}: has {m.num_layers()} layers but the base has {layers}; experts must "
                              "have the base's depth")
        return refs.index(m.ref)

    expert_models = [member(e.source_model, ("experts", i, "source_model")) for i, e in enumerate(cfg.experts)]
    shared_model = member(shared[0].source_model, ("shared_experts", 0, "source_model")) if shared else None
    models = [cache[r] for r in refs]

    out_dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    if out_dtype is None:
        declared = base.config.get("torch_dtype") or base.config.get("dtype")
        out_dtype = DTYPES.get(declared) if isinstance(declared, str) else None
    router_dtype = out_dtype or base.source.info("model.embed_tokens.weight").dtype

    tasks: list[Task] = []
    for n in names:
        if LAYER_MLP.match(n) or SKIP.search(n):
            continue
        info = base.source.info(n)
        dt = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
        tasks.append(Task(n, tuple(info.shape), dt, "copy", 0, n))
    if arch.zero_qkv_bias:  # Qwen2-MoE's attention always has q/k/v biases: zeros for Llama/Mistral inputs
        for layer in range(layers):
            for p in ("q_proj", "k_proj", "v_proj"):
                n = f"model.layers.{layer}.self_attn.{p}.bias"
                if n not in base.source:
                    rows = base.source.info(f"model.layers.{layer}.self_attn.{p}.weight").shape[0]
                    tasks.append(Task(n, (rows,), router_dtype, "zeros", layer=layer))

    members = [(i, expert_models[i], ("experts", i, "source_model")) for i in range(len(cfg.experts))]
    if shared:
        members.append((SHARED, shared_model, ("shared_experts", 0, "source_model")))
    mlp_shapes: dict[str, tuple] = {}
    mlp_dtype: torch.dtype | None = None
    for layer in range(layers):
        for ei, mi, path in members:
            m = models[mi]
            for proj in PROJS:
                src = f"model.layers.{layer}.mlp.{proj}.weight"
                if src not in m.source:
                    raise MoergeError(f"{_where(cfg, path)}: has no {src}; experts need MLPs of gate_proj, up_proj and "
                                      "down_proj in every layer")
                info = m.source.info(src)
                want = mlp_shapes.setdefault(proj, tuple(info.shape))
                if tuple(info.shape) != want:
                    raise MoergeError(f"{_where(cfg, path)}: {src} is {list(info.shape)} but the first expert's is "
                                      f"{list(want)}; {arch.name} needs every expert's MLP to be the same size")
                if hidden not in info.shape:
                    raise MoergeError(f"{_where(cfg, path)}: {src} is {list(info.shape)}, which does not fit the base's "
                                      f"hidden size {hidden}")
                mlp_dtype = mlp_dtype or info.dtype
                if arch.fused:
                    continue
                name = arch.shared_name(layer, proj) if ei == SHARED else arch.expert_name(layer, ei, proj)
                tasks.append(Task(name, tuple(info.shape), out_dtype or info.dtype, "expert", mi, src, ei, layer))
        if arch.fused:
            inter, n = mlp_shapes["gate_proj"][0], len(cfg.experts)
            pre = f"model.layers.{layer}.mlp.experts"
            tasks.append(Task(f"{pre}.gate_up_proj", (n, 2 * inter, hidden), out_dtype or mlp_dtype, "fused",
                              src="gate_up_proj", layer=layer))
            tasks.append(Task(f"{pre}.down_proj", (n, hidden, inter), out_dtype or mlp_dtype, "fused",
                              src="down_proj", layer=layer))
        tasks.append(Task(arch.router_name(layer), (len(cfg.experts), hidden), router_dtype, "router", layer=layer))
        if arch.gates_shared(shared):
            tasks.append(Task(arch.shared_gate_name(layer), (1, hidden), router_dtype, "shared_gate", layer=layer))
    intermediate = mlp_shapes["gate_proj"][0]
    out_config = _out_config(arch, base, cfg, intermediate, out_dtype or router_dtype)
    plan = MoEPlan(cfg, arch, models, expert_models, shared_model, tasks, out_dtype, router_dtype, layers, hidden,
                   out_config)
    if cfg.gate_mode == "library":
        plan.library_rows = _library_rows(cfg, base, [models[i] for i in expert_models]
                                          + ([models[shared_model]] if arch.gates_shared(shared) else []), hidden, library)
    n = len(cfg.experts)
    if n & (n - 1):
        plan.notes.append(f"note: {n} experts is not a power of two; llama.cpp cannot run this model")
    if arch.name == "DeepSeek MoE":
        plan.notes.append("note: DeepSeek MoE output loads with trust_remote_code=True (its modelling code is "
                          "deepseek-ai/deepseek-moe-16b-base's, fetched from the hub), as mergekit's does")
    if cfg.gate_mode in ("hidden", "hidden_last", "hidden_avg"):
        plan.notes.append("note: gate_mode hidden runs the base model on the prompts (the base is held in memory then, "
                          "in bfloat16 if it is stored in half precision)")
    return plan


def _library_rows(cfg: MoEConfig, base: Model, experts: list[Model], hidden: int, library) -> torch.Tensor:
    """gate_mode library: each expert's task centroid (the base's mean-pooled final hidden states of its
    task's prompts, recorded in its library card), normalised; the same row for every layer."""
    lib = Library.open(library)
    base_fp = None
    rows = []
    for i, m in enumerate(experts):
        path = ("experts", i, "source_model") if i < len(cfg.experts) else ("shared_experts", 0, "source_model")
        where = _where(cfg, path)
        if not m.pinned.startswith("library://"):
            raise MoergeError(f"{where}: gate_mode library takes the router row from a library card's task centroid, so "
                              "this expert must be library://NAME; give one, or use gate_mode hidden with prompts")
        card = lib.get(m.pinned.removeprefix("library://")).card or {}
        c = card.get("centroid")
        if not c:
            raise MoergeError(f"{where}: {m.pinned} has no task centroid in its card (gate_mode library needs one); record "
                              "it when adding the expert (moerge library add ... --prompts FILE) or use gate_mode hidden")
        if len(c) != hidden:
            raise MoergeError(f"{where}: {m.pinned}'s task centroid is {len(c)}-dim but the base's hidden size is {hidden}; "
                              "it was not computed on this base")
        if card.get("centroid_base"):
            base_fp = base_fp or fingerprint(base.source)
            if card["centroid_base"] != base_fp:
                raise MoergeError(f"{where}: {m.pinned}'s task centroid was computed on another base than base_model "
                                  f"{cfg.base_model}; use the library's base as base_model")
        rows.append(torch.tensor(c, dtype=torch.float32))
    rows = torch.stack(rows)
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _out_config(arch: Arch, base: Model, cfg: MoEConfig, intermediate: int, dtype: torch.dtype) -> dict:
    from transformers import AutoConfig

    try:
        bcfg = AutoConfig.from_pretrained(str(base.folder))
    except Exception as e:  # transformers raises many types for a broken config
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MoergeError(f"{base.ref}: cannot read its config.json ({first}); fix or re-download it") from None
    return arch.config(bcfg, experts=len(cfg.experts), per_token=cfg.experts_per_token, intermediate=intermediate,
                       shared=len(cfg.shared_experts or []), dtype_name=DTYPE_NAMES[dtype])


# ---------------------------------------------------------------------- running

def compute_routers(plan: MoEPlan, hidden_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(layers, gated experts, hidden) router rows, float32 (``hidden_dtype``: the forward pass's dtype);
    a gated shared expert's row comes last."""
    cfg = plan.config
    gated = plan.gated
    if cfg.gate_mode == "library":
        return plan.library_rows.unsqueeze(0).repeat(plan.num_layers, 1, 1)
    if cfg.gate_mode in ("random", "uniform_random"):
        return router.random_gates(cfg.gate_mode, plan.num_layers, len(gated), plan.hidden, cfg.seed)
    tok = router.load_tokenizer(plan.base.folder)
    if cfg.gate_mode == "cheap_embed":
        embed = plan.base.source.get("model.embed_tokens.weight")
        fn = lambda batch: router.cheap_embedding(embed, batch, plan.num_layers)  # noqa: E731
        return router.gate_vectors(gated, fn, tok).float()
    model = load_dense(plan.base, hidden_dtype)  # freed on return, before any output is written
    fn = lambda batch: router.hidden_states(model, batch, average=cfg.gate_mode == "hidden_avg")  # noqa: E731
    return router.gate_vectors(gated, fn, tok).float()


def _expert_tensor(plan: MoEPlan, model: int, src: str, expert: int, name: str) -> torch.Tensor:
    """One dense MLP tensor with the expert's noise_scale (seeded by the output name) and residual_scale."""
    t = plan.models[model].source.get(src)
    e = plan.expert_cfg(expert)
    if e.noise_scale:
        g = torch.Generator().manual_seed(tensor_seed(plan.config.seed, name))
        t = t.float() + torch.randn(t.shape, generator=g) * e.noise_scale
    if src.endswith("down_proj.weight") and e.residual_scale is not None:
        t = t.float() * e.residual_scale
    return t


def produce(plan: MoEPlan, task: Task, routers: torch.Tensor) -> torch.Tensor:
    n = len(plan.config.experts)
    if task.kind == "router":
        return routers[task.layer, :n].to(task.dtype)
    if task.kind == "shared_gate":
        return routers[task.layer, n:n + 1].to(task.dtype)
    if task.kind == "zeros":
        return torch.zeros(task.shape, dtype=task.dtype)
    if task.kind == "fused":  # one layer's MLPs of every expert, stacked
        projs = ("gate_proj", "up_proj") if task.src == "gate_up_proj" else ("down_proj",)
        parts = [_expert_tensor(plan, plan.expert_models[e], f"model.layers.{task.layer}.mlp.{p}.weight", e,
                                plan.arch.expert_name(task.layer, e, p)).to(task.dtype)
                 for e in range(n) for p in projs]
        return fused_experts(parts, task.src)
    if task.kind == "expert":
        t = _expert_tensor(plan, task.model, task.src, task.expert, task.name)
    else:
        t = plan.models[task.model].source.get(task.src)
    return t.to(task.dtype) if t.dtype != task.dtype else t


def card_text(plan: MoEPlan, inputs: list[dict]) -> str:
    import yaml

    front = {"base_model": [m["model"] for m in inputs], "library_name": "transformers",
             "tags": ["merge", "moerge", "moe", plan.arch.name.split()[0].lower()]}
    rows = "\n".join(f"| `{m['model']}` | {m['role']} | `{m['fingerprint']}` |" for m in inputs)
    return ("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n# Mixture of experts\n\n"
            f"Built with [moerge](https://pypi.org/project/moerge/) {__version__} from dense models (mergekit-moe's "
            f"config): a {plan.arch.name} model with {len(plan.config.experts)} experts, {plan.config.experts_per_token} per token, "
            f"routers from gate_mode `{plan.config.gate_mode}`.\n\n"
            "## Inputs\n\n| model | role | fingerprint |\n|---|---|---|\n" + rows + "\n\n"
            "## Config\n\nRe-run with `moerge merge moerge_recipe.yaml OUT_DIR`.\n\n```yaml\n" + pinned_config(plan).to_yaml() + "```\n")


def pinned_config(plan: MoEPlan) -> MoEConfig:
    refs = {m.ref: m.pinned for m in plan.models if m.pinned != m.ref}
    c = plan.config.model_copy(deep=True)
    c.base_model = refs.get(c.base_model, c.base_model)
    for e in c.experts + (c.shared_experts or []):
        e.source_model = refs.get(e.source_model, e.source_model)
    return c


def execute_moe(plan: MoEPlan, out_dir, *, overwrite: bool = False, shard_size="5B", progress: bool = False,
                hidden_dtype: torch.dtype | None = None):
    """Write the MoE. ``hidden_dtype``: the dtype gate_mode hidden runs the base in; by default bfloat16
    for a half-precision base (as mergekit runs it, and the memory of the base on disk), else float32."""
    out_dir = Path(out_dir)
    out = out_dir.resolve()
    for m in plan.models:
        for p in (m.folder, m.lora):
            if p is not None and (out == p.resolve() or p.resolve().is_relative_to(out)):
                raise MoergeError(f"{out_dir}: is (or contains) the input {m.ref}; write the MoE to another folder")
    size = parse_size(shard_size)
    if out_dir.exists() and not overwrite:
        raise MoergeError(f"{out_dir}: already exists; choose another folder or pass --overwrite")
    start = time.perf_counter()
    if progress and plan.config.gate_mode in PROMPT_MODES:
        import sys

        n = sum(len(e.positive_prompts or []) + len(e.negative_prompts or []) for e in plan.gated)
        print(f"router rows ({plan.config.gate_mode}): {n} prompts through the base", file=sys.stderr, flush=True)
    if hidden_dtype is None:
        stored = plan.base.source.info("model.embed_tokens.weight").dtype
        hidden_dtype = torch.bfloat16 if stored in (torch.bfloat16, torch.float16) else torch.float32
    routers = compute_routers(plan, hidden_dtype)  # before anything is written: a failure leaves nothing
    writer = ShardedWriter(out_dir, [(t.name, t.shape, t.dtype) for t in plan.tasks], size, overwrite)
    done = 0
    try:
        log = None
        if progress:

            log = ProgressLog("writing the MoE", len(plan.tasks), unit="tensors")
        for t in plan.tasks:
            writer.write(t.name, produce(plan, t, routers))
            done += t.nbytes
            if log is not None:
                log.step()
        if log is not None:
            log.done()
        writer.add_file("config.json", json.dumps(plan.out_config, indent=2) + "\n")
        base = plan.base.folder
        if base.is_dir() and (base / "generation_config.json").is_file():
            writer.copy_file(base / "generation_config.json")
        if base.is_dir():
            for name in TOKENIZER_FILES:
                if (base / name).is_file():
                    writer.copy_file(base / name)
        roles: dict[int, list[str]] = {0: ["base"]}
        for e, i in enumerate(plan.expert_models):
            roles.setdefault(i, []).append(f"expert {e}")
        if plan.shared_model is not None:
            roles.setdefault(plan.shared_model, []).append("shared expert")
        inputs = [{"model": m.pinned, "role": ", ".join(roles.get(i, [])), "fingerprint": fingerprint(m.source)}
                  for i, m in enumerate(plan.models)]
        writer.add_file("moerge_recipe.yaml", pinned_config(plan).to_yaml())
        writer.add_file("README.md", card_text(plan, inputs))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return MergeResult(out_dir, len(plan.tasks), done, time.perf_counter() - start)
