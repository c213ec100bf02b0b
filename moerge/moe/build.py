"""Plan and write a Mixtral checkpoint from Llama/Mistral models (mergekit-moe's Mixtral output).

Planning opens every input lazily (headers only) and checks names, shapes and architectures; the run
computes the router rows first (the only step that reads more than one tensor at a time: ``hidden``
runs the base model), then streams every output tensor through the ShardedWriter one at a time, into
a hidden folder renamed into place when complete.

Output layout (the Mixtral checkpoint format, which transformers, vLLM and llama.cpp read):
``model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` from expert E's
``mlp.{gate,up,down}_proj``, ``model.layers.L.block_sparse_moe.gate.weight`` (experts x hidden), and
everything else (embeddings, attention, norms, LM head) from the base.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.engine.plan import DTYPES, Model, _human, open_model, tensor_seed
from moerge.engine.recipe import _line_map
from moerge.errors import MoergeError
from moerge.moe.config import PROMPT_MODES, MoEConfig, _at, same_experts_error

MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
LAYER_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.")
SKIP = re.compile(r"rotary_emb\.inv_freq$")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Task:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # copy | expert | router
    model: int = 0  # index into MoEPlan.models
    src: str = ""
    expert: int = 0
    layer: int = 0

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


@dataclass
class MoEPlan:
    config: MoEConfig
    models: list[Model]  # distinct inputs: the base first
    expert_models: list[int]  # per expert: its index in models
    tasks: list[Task]
    out_dtype: torch.dtype | None
    router_dtype: torch.dtype
    num_layers: int
    hidden: int
    mixtral_config: dict
    notes: list[str] = field(default_factory=list)
    library_rows: torch.Tensor | None = None  # gate_mode library: (experts, hidden) task centroids

    @property
    def base(self) -> Model:
        return self.models[0]

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    def summary(self) -> str:
        c = self.config
        kinds = {k: sum(t.kind == k for t in self.tasks) for k in ("copy", "expert", "router")}
        lines = [
            f"method: moe (Mixtral output, gate_mode {c.gate_mode}" + (f", seed {c.seed}" if c.gate_mode in ("random", "uniform_random") else "") + ")",
            f"base: {self.base.pinned}",
            "experts: " + ", ".join(self.models[i].pinned for i in self.expert_models),
            f"experts per token: {c.experts_per_token} of {len(c.experts)}",
            f"output tensors: {len(self.tasks)}  ({kinds['copy']} from the base, {kinds['expert']} expert MLP, "
            f"{kinds['router']} router)",
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
    if btype not in ("llama", "mistral"):
        raise MoergeError(f"{_where(cfg, ('base_model',))}: is a {btype or 'model without a model_type in config.json'}; "
                          "the Mixtral output needs Llama or Mistral models (other MoE outputs are not supported yet)")
    for key in ("attention_bias", "mlp_bias"):
        if base.config.get(key):
            raise MoergeError(f"{_where(cfg, ('base_model',))}: has {key}: true in config.json, which Mixtral has no "
                              "place for; use models without biases")
    layers = base.num_layers()
    names = base.source.names()
    if "model.embed_tokens.weight" not in base.source:
        raise MoergeError(f"{_where(cfg, ('base_model',))}: has no model.embed_tokens.weight; is it a Llama checkpoint?")
    hidden = base.source.info("model.embed_tokens.weight").shape[1]
    expert_models: list[int] = []
    refs: list[str] = [base.ref]
    for i, e in enumerate(cfg.experts):
        m = _open(cfg, e.source_model, ("experts", i, "source_model"), library, cache)
        if m.ref not in refs:
            refs.append(m.ref)
        expert_models.append(refs.index(m.ref))
        if _model_type(m) != btype:
            raise MoergeError(f"{_where(cfg, ('experts', i, 'source_model'))}: is a {_model_type(m) or 'model without a model_type'} "
                              f"but the base is {btype}; Mixtral output needs every input to have the base's architecture")
        if m.num_layers() != layers:
            raise MoergeError(f"{_where(cfg, ('experts', i, 'source_model'))}: has {m.num_layers()} layers but the base has "
                              f"{layers}; experts must have the base's depth")
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
    mlp_shapes: dict[str, tuple] = {}
    for layer in range(layers):
        for ei, e in enumerate(cfg.experts):
            m = models[expert_models[ei]]
            for proj, w in MLP.items():
                src = f"model.layers.{layer}.mlp.{proj}.weight"
                if src not in m.source:
                    raise MoergeError(f"{_where(cfg, ('experts', ei, 'source_model'))}: has no {src}; experts need Llama "
                                      "MLPs (gate_proj, up_proj, down_proj) in every layer")
                info = m.source.info(src)
                want = mlp_shapes.setdefault(proj, tuple(info.shape))
                if tuple(info.shape) != want:
                    raise MoergeError(f"{_where(cfg, ('experts', ei, 'source_model'))}: {src} is {list(info.shape)} but the "
                                      f"first expert's is {list(want)}; Mixtral needs every expert's MLP to be the same size")
                if hidden not in info.shape:
                    raise MoergeError(f"{_where(cfg, ('experts', ei, 'source_model'))}: {src} is {list(info.shape)}, which "
                                      f"does not fit the base's hidden size {hidden}")
                tasks.append(Task(f"model.layers.{layer}.block_sparse_moe.experts.{ei}.{w}.weight", tuple(info.shape),
                                  out_dtype or info.dtype, "expert", expert_models[ei], src, ei, layer))
        tasks.append(Task(f"model.layers.{layer}.block_sparse_moe.gate.weight", (len(cfg.experts), hidden), router_dtype,
                          "router", layer=layer))
    rows = _library_rows(cfg, base, [models[i] for i in expert_models], hidden, library) if cfg.gate_mode == "library" else None
    intermediate = mlp_shapes["gate_proj"][0]
    plan = MoEPlan(cfg, models, expert_models, tasks, out_dtype, router_dtype, layers, hidden,
                   _mixtral_config(base, cfg, intermediate, out_dtype or router_dtype))
    plan.library_rows = rows
    n = len(cfg.experts)
    if n & (n - 1):
        plan.notes.append(f"note: {n} experts is not a power of two; llama.cpp cannot run this model")
    if cfg.gate_mode in ("hidden", "hidden_last", "hidden_avg"):
        plan.notes.append("note: gate_mode hidden runs the base model on the prompts (the base is held in memory then)")
    return plan


def _library_rows(cfg: MoEConfig, base: Model, experts: list[Model], hidden: int, library) -> torch.Tensor:
    """gate_mode library: each expert's task centroid (the base's mean-pooled final hidden states of its
    task's prompts, recorded in its library card), normalised; the same row for every layer."""
    from moerge.io.fingerprint import fingerprint
    from moerge.library import Library

    lib = Library.open(library)
    base_fp = None
    rows = []
    for i, m in enumerate(experts):
        where = _where(cfg, ("experts", i, "source_model"))
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


def _mixtral_config(base: Model, cfg: MoEConfig, intermediate: int, dtype: torch.dtype) -> dict:
    from transformers import AutoConfig, MistralConfig, MixtralConfig

    try:
        bcfg = AutoConfig.from_pretrained(str(base.folder))
    except Exception as e:  # transformers raises many types for a broken config
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MoergeError(f"{base.ref}: cannot read its config.json ({first}); fix or re-download it") from None
    d = bcfg.to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        d.pop(k, None)
    mistral = MistralConfig(**d)
    mistral.sliding_window = None
    d = mistral.to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        d.pop(k, None)
    out = MixtralConfig(**d)
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(cfg.experts)
    out.num_experts_per_tok = cfg.experts_per_token
    out.intermediate_size = intermediate
    out.sliding_window = None
    out.dtype = DTYPE_NAMES[dtype]
    return json.loads(out.to_json_string(use_diff=True))


# ---------------------------------------------------------------------- running

def compute_routers(plan: MoEPlan, hidden_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(layers, experts, hidden) router rows, float32 (``hidden_dtype``: the forward pass's dtype)."""
    from moerge.moe import router

    cfg = plan.config
    if cfg.gate_mode == "library":
        return plan.library_rows.unsqueeze(0).repeat(plan.num_layers, 1, 1)
    if cfg.gate_mode in ("random", "uniform_random"):
        return router.random_gates(cfg.gate_mode, plan.num_layers, len(cfg.experts), plan.hidden, cfg.seed)
    tok = router.load_tokenizer(plan.base.folder)
    if cfg.gate_mode == "cheap_embed":
        embed = plan.base.source.get("model.embed_tokens.weight")
        fn = lambda batch: router.cheap_embedding(embed, batch, plan.num_layers)  # noqa: E731
        return router.gate_vectors(cfg.experts, fn, tok).float()
    model = router.load_dense(plan.base, hidden_dtype)  # freed on return, before any output is written
    fn = lambda batch: router.hidden_states(model, batch, average=cfg.gate_mode == "hidden_avg")  # noqa: E731
    return router.gate_vectors(cfg.experts, fn, tok).float()


def produce(plan: MoEPlan, task: Task, routers: torch.Tensor) -> torch.Tensor:
    if task.kind == "router":
        return routers[task.layer].to(task.dtype)
    t = plan.models[task.model].source.get(task.src)
    if task.kind == "expert":
        e = plan.config.experts[task.expert]
        if e.noise_scale:
            g = torch.Generator().manual_seed(tensor_seed(plan.config.seed, task.name))
            t = t.float() + torch.randn(t.shape, generator=g) * e.noise_scale
        if task.src.endswith("down_proj.weight") and e.residual_scale is not None:
            t = t.float() * e.residual_scale
    return t.to(task.dtype) if t.dtype != task.dtype else t


def card_text(plan: MoEPlan, inputs: list[dict]) -> str:
    import yaml

    from moerge import __version__

    front = {"base_model": [m["model"] for m in inputs], "library_name": "transformers",
             "tags": ["merge", "moerge", "moe", "mixtral"]}
    rows = "\n".join(f"| `{m['model']}` | {m['role']} | `{m['fingerprint']}` |" for m in inputs)
    return ("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n# Mixture of experts\n\n"
            f"Built with [moerge](https://pypi.org/project/moerge/) {__version__} from dense models (mergekit-moe's "
            f"config): a Mixtral model with {len(plan.config.experts)} experts, {plan.config.experts_per_token} per token, "
            f"routers from gate_mode `{plan.config.gate_mode}`.\n\n"
            "## Inputs\n\n| model | role | fingerprint |\n|---|---|---|\n" + rows + "\n\n"
            "## Config\n\nRe-run with `moerge merge moerge_recipe.yaml OUT_DIR`.\n\n```yaml\n" + pinned_config(plan).to_yaml() + "```\n")


def pinned_config(plan: MoEPlan) -> MoEConfig:
    refs = {m.ref: m.pinned for m in plan.models if m.pinned != m.ref}
    c = plan.config.model_copy(deep=True)
    c.base_model = refs.get(c.base_model, c.base_model)
    for e in c.experts:
        e.source_model = refs.get(e.source_model, e.source_model)
    return c


def execute_moe(plan: MoEPlan, out_dir, *, overwrite: bool = False, shard_size="5B", progress: bool = False,
                hidden_dtype: torch.dtype = torch.float32):
    from moerge.engine.card import TOKENIZER_FILES
    from moerge.engine.executor import MergeResult
    from moerge.io.fingerprint import fingerprint
    from moerge.io.writer import ShardedWriter, parse_size

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

        n = sum(len(e.positive_prompts or []) + len(e.negative_prompts or []) for e in plan.config.experts)
        print(f"router rows ({plan.config.gate_mode}): {n} prompts through the base", file=sys.stderr, flush=True)
    routers = compute_routers(plan, hidden_dtype)  # before anything is written: a failure leaves nothing
    writer = ShardedWriter(out_dir, [(t.name, t.shape, t.dtype) for t in plan.tasks], size, overwrite)
    done = 0
    try:
        log = None
        if progress:
            from moerge.util import ProgressLog

            log = ProgressLog("writing the MoE", len(plan.tasks), unit="tensors")
        for t in plan.tasks:
            writer.write(t.name, produce(plan, t, routers))
            done += t.nbytes
            if log is not None:
                log.step()
        if log is not None:
            log.done()
        writer.add_file("config.json", json.dumps(plan.mixtral_config, indent=2) + "\n")
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
        inputs = [{"model": m.pinned, "role": ", ".join(roles.get(i, [])), "fingerprint": fingerprint(m.source)}
                  for i, m in enumerate(plan.models)]
        writer.add_file("moerge_recipe.yaml", pinned_config(plan).to_yaml())
        writer.add_file("README.md", card_text(plan, inputs))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return MergeResult(out_dir, len(plan.tasks), done, time.perf_counter() - start)
