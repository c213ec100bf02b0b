"""Training a specialist expert from a base: a PEFT adapter (LoRA, DoRA, (IA)³) or a full fine-tune.

The output is what the rest of the ecosystem already reads: an adapter folder that
``PeftModel.from_pretrained`` loads (or, for a full fine-tune, a model folder), plus ``expert.json``,
the expert card that the library and the routers rely on: the task, the base's fingerprint (so an
expert is never applied to another base), the adapter kind and size, a hash of the data, the
training settings and the validation accuracy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.experts.card import (
    ADAPTERS,
    ALIASES,
    CARD,
    ExpertCard,
    read_card,
    recorded_base,
)
from moerge.experts.embed import (
    SentenceEmbedder,
    record_embedding,
    task_centroids,
    with_task_embedding,
)
from moerge.experts.peft_format import load_adapter
from moerge.io.fingerprint import folder_fingerprint
from moerge.io.source import open_source
from moerge.lm import base as base_model
from moerge.lm.arch import ia3_modules, stacked_parameters
from moerge.lm.device import device_map, dispatched, model_device
from moerge.lm.device import resolve as resolve_device
from moerge.lm.generate import exact_match
from moerge.tasks import mixture, read_jsonl
from moerge.tasks.training_data import data_hash, split_user_data, training_rows
from moerge.train.loop import train
from moerge.util.files import atomic_dir, atomic_file, check_output_dir
from moerge.util.progress import progress_bar

# learning rates that train the built-in skills in a few hundred steps (see README: Experts)
DEFAULT_LR = {"lora": 5e-3, "dora": 5e-3, "ia3": 3e-2, "full": 1e-3}
MIN_EXAMPLES = 20  # below this, a JSONL file cannot train an expert and still leave rows to validate it on


def peft_config(adapter: str, rank: int = 8, model=None):
    """LoRA and DoRA on all linear layers (on tiny models, attention-only adapters barely learn a new
    skill) and, on an MoE base, LoRA on its stacked experts too; (IA)³ on the keys, values and
    feed-forward layers of ``model``'s family (``lm.arch``)."""
    from peft import IA3Config, LoraConfig

    if adapter in ("lora", "dora"):
        stacks = stacked_parameters(model) if model is not None else []
        if stacks and adapter == "dora":
            raise MoergeError(f"DoRA on {model.config.model_type}: its experts' weights are stacked 3-D parameters, which PEFT "
                              "trains with plain LoRA only (target_parameters); use --adapter lora")
        return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                          target_parameters=stacks or None, use_dora=adapter == "dora", task_type="CAUSAL_LM")
    if adapter == "ia3":
        if model is None:
            raise MoergeError("(IA)3 needs the model to find its key, value and feed-forward layers")
        targets, ff = ia3_modules(model)
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")
    raise MoergeError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")


def train_expert(
    out_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    task: str | None = None,
    data: str | os.PathLike | None = None,
    adapter: str = "lora",
    steps: int = 200,
    lr: float | None = None,
    rank: int = 8,
    batch_size: int = 64,
    n_train: int = 3000,
    n_val: int = 100,
    seed: int = 0,
    embedder: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    gradient_checkpointing: bool = False,
    quantize: str | None = None,
) -> ExpertCard:
    """Train one expert on a built-in task or a JSONL file and save it atomically into ``out_dir``,
    with its card; with ``embedder`` also the task centroids of a sentence-embedding model (those of
    the base are always recorded). PHATGOOSE gates are trained afterwards (``moerge.api.train_expert``).
    ``n_val``: validation examples of a built-in task (at least 20 per task), generated and scored
    after training. For a base bigger than the memory: ``gradient_checkpointing`` recomputes each
    layer's activations in the backward pass instead of keeping them (less memory, about a third more
    time, the same gradients); ``quantize="4bit"`` is QLoRA (Dettmers et al. 2023): the frozen base
    in 4-bit NF4 (bitsandbytes, CUDA only), the LoRA factors in full precision, saved as a plain
    adapter of the full-precision base."""
    if (task is None) == (data is None):
        raise MoergeError("give exactly one of --task NAME or --data FILE.jsonl")
    adapter = ALIASES.get(adapter, adapter)
    if adapter not in ADAPTERS:
        raise MoergeError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")
    if device_map():
        raise MoergeError("--device-map auto is for evaluation, routing and serving; training needs the model on one device: "
                          "use --gradient-checkpointing (less memory) or --quantize 4bit (QLoRA, on a GPU)")
    quantization = _quantization(quantize, adapter, resolve_device(device))
    out = check_output_dir(out_dir, overwrite, inputs=(base, data))
    if task is not None:
        names = [t.strip() for t in task.split(",") if t.strip()]  # several: a multitask expert
        train_rows = mixture(names, "train", max(1, n_train // len(names)) * (1 if len(names) == 1 else 2), seed)
        val_rows = mixture(names, "validation", max(20, n_val // len(names)), seed)
        task, source = ",".join(names), "moerge:" + ",".join(names)
    else:
        rows = read_jsonl(data)
        if len(rows) < MIN_EXAMPLES:
            raise MoergeError(f"{data}: has {len(rows)} examples; an expert needs at least {MIN_EXAMPLES} to train and "
                              "validate on (a few hundred learn a skill)")
        train_rows, val_rows = split_user_data(rows)
        if not val_rows:
            raise MoergeError(f"{data}: none of its {len(rows)} prompts falls in the validation split (about 1 in 5 does), "
                              "so the expert could not be validated; add more examples")
        # the card pins the data by absolute path and hash, so it is found (and checked) from any folder
        task, source = Path(data).stem, str(Path(data).resolve())
    base_dir = base_model.resolve(base)
    # a full fine-tune's weights are what the optimizer updates: float32 masters whatever the checkpoint's dtype;
    # an adapter trains in float32 over a bf16 base where the CPU multiplies bf16 natively (moerge.lm.precision)
    # on the chosen device (``--device``; None: the setting, ``auto``: CUDA when there is one)
    model, tok = base_model.load(base_dir, dtype=torch.float32 if adapter == "full" else None,
                                 device=resolve_device(device), quantization=quantization)
    computed_in = str(next(model.parameters()).dtype).removeprefix("torch.")

    prompts = [r.prompt for r in train_rows[:256]]
    centroid, centroids = task_centroids(model, tok, prompts)
    embeddings = record_embedding({}, SentenceEmbedder(embedder), prompts)["embeddings"] if embedder else {}
    torch.manual_seed(seed)
    if adapter == "full":
        model.train()
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if quantization is not None:  # norms in float32, inputs that carry gradients through the frozen 4-bit layers
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, peft_config(adapter, rank, model))
    if gradient_checkpointing:  # non-reentrant: frozen embeddings need no input gradients for it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = lr or DEFAULT_LR[adapter]
    start = time.perf_counter()
    with progress_bar(progress, f"training {adapter} expert: {task}", steps) as advance:
        stats = train(model, tok, train_rows, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                      on_step=lambda s, loss: advance(loss))
    seconds = time.perf_counter() - start
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()  # generation (validation) keeps its cache
    val = exact_match(model, tok, val_rows) if val_rows else None
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if adapter == "full":
            tok.save_pretrained(tmp)
        weights = [f for f in tmp.iterdir() if f.suffix in (".safetensors", ".bin")]
        card = ExpertCard(
            task=task, adapter=adapter, base=str(base_dir.absolute()), base_fingerprint=folder_fingerprint(base_dir),
            trainable_params=trainable, adapter_bytes=sum(f.stat().st_size for f in weights), data=source,
            data_sha256=data_hash(train_rows), examples=len(train_rows), steps=steps, lr=lr, batch_size=batch_size,
            rank=rank if adapter in ("lora", "dora") else None, seed=seed, seconds=round(seconds, 1), dtype=computed_in,
            final_loss=round(stats.final_loss, 4), validation_accuracy=val, centroid=centroid, centroids=centroids,
            embeddings=embeddings,
            extra={"quantized_base": quantize} if quantize else {},
        )
        card.write(tmp)
    return card


QUANTIZE = ("4bit",)


def _quantization(quantize: str | None, adapter: str, device: torch.device):
    """bitsandbytes' 4-bit config for QLoRA, or None; refused in one line where it cannot run."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise MoergeError(f"--quantize {quantize!r}: give 4bit (QLoRA: the base in 4-bit NF4)")
    if adapter not in ("lora", "dora"):
        raise MoergeError(f"--quantize {quantize}: QLoRA trains LoRA (or DoRA) over a frozen 4-bit base, not a {adapter} expert")
    if device.type != "cuda":
        raise MoergeError(f"--quantize {quantize}: bitsandbytes' 4-bit layers need a CUDA GPU; this run is on {device} "
                          "(drop --quantize, or run with --device cuda)")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise MoergeError(f"--quantize {quantize}: needs bitsandbytes: pip install 'moerge[qlora]'") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def load_expert(base_dir: str | os.PathLike | None, expert_dir: str | os.PathLike, device=None):
    """(model, tokenizer): the base (None: the one the expert's card names, else the built-in base) with
    the expert applied. Any PEFT adapter folder is accepted, with
    or without ``expert.json``; it is first checked against the base (``check_base``: the card's base
    fingerprint or PEFT's ``base_model_name_or_path``, then every tensor's name and shape), so a
    wrong base is one clear line, not a PEFT traceback. A full fine-tune (a model folder) loads as is.
    ``device``: where it computes (None: the CPU)."""
    expert_dir = Path(expert_dir)
    if not expert_dir.is_dir():
        raise MoergeError(f"{expert_dir}: no such expert folder; check the path")
    if not (expert_dir / "adapter_config.json").is_file():
        if (expert_dir / "config.json").is_file():  # a full fine-tune is a model of its own
            if base_dir is not None:  # ... of the base named, or refused: a score must not be labelled with another base
                _check_finetune_of(expert_dir, base_model.resolve(base_dir))
            return base_model.load(expert_dir, device=device)
        raise MoergeError(f"{expert_dir}: neither a PEFT adapter (no adapter_config.json) nor a model folder (no config.json)")
    base_dir = base_model.resolve(base_dir if base_dir is not None else recorded_base(expert_dir, "give that base"))
    base_model.check_model_folder(base_dir, "base model")
    load_adapter(expert_dir, open_source(base_dir))  # the base check, and a truncated or mismatched adapter
    if device_map():  # spread by accelerate (some layers maybe on disk): the adapter goes into the weights first
        return base_model.load(_applied(base_dir, expert_dir), device=device)
    from peft import PeftModel

    model, tok = base_model.load(base_dir, device=device)
    try:
        peft_model = PeftModel.from_pretrained(model, expert_dir)
        if not dispatched(model):  # a model accelerate spread keeps its placement; the adapter follows its layers
            peft_model.to(model_device(model))
        return peft_model.eval(), tok
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MoergeError(f"{expert_dir}: PEFT cannot load it on {base_dir} ({first}); check it is a PEFT adapter of this base") from None


def _check_finetune_of(finetune: Path, base_dir: Path) -> None:
    """A full fine-tune given with a base: made for it (its card's fingerprint) and of its shapes."""
    from moerge.experts.peft_format import check_base

    base = open_source(base_dir)
    check_base(finetune, base)
    ft = open_source(finetune)
    for name in base.names():
        if name not in ft or tuple(ft.info(name).shape) != tuple(base.info(name).shape):
            raise MoergeError(f"{finetune}: a full fine-tune whose tensors do not match {base_dir} ({name}); was it made "
                              "for another base? Evaluate it alone (moerge eval FOLDER)")


def _applied(base_dir: Path, expert_dir: Path) -> Path:
    """The base with the expert merged in (``base+adapter``, streamed by the merge engine, tensor by
    tensor, as PEFT's ``merge_and_unload`` would give it), in this process's offload folder: what a
    base spread over devices and disk loads instead of the base with PEFT's layers on top, which
    accelerate would have to lay out again."""
    import hashlib

    from moerge.engine.run import run

    # named by the base and this very adapter (its path, size and time), so two experts of one name never share it
    weights = next(expert_dir.glob("adapter_model.*"))
    stat = weights.stat()
    key = hashlib.sha256(f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = Path(base_model.offload_folder()) / f"applied-{folder_fingerprint(base_dir)[7:19]}-{key}"
    if not (out / "config.json").is_file():
        run({"merge_method": "passthrough", "models": [{"model": f"{base_dir}+{expert_dir}"}]}, out, overwrite=True)
    return out


def refit_expert(expert_dir: str | os.PathLike, base: str | os.PathLike, rows, *, steps: int, most: int | None = None,
                 stop=None, lr: float | None = None, batch_size: int = 64, seed: int = 0,
                 device: str | None = None) -> tuple[int, float]:
    """Continue training the expert in ``expert_dir`` (an adapter, or a full fine-tune's model folder) on
    ``base`` from its own weights, ``steps`` steps of ``rows`` at a time (each chunk its own warm-up and
    decay, on fresh batches) until ``stop(model, tokenizer)`` says so or ``most`` steps (default:
    ``steps``) are done; save it back in place once. Returns (steps done, final loss). This is how
    ``expert rebase`` repairs an expert whose factors no longer fit a fused base: a warm start needs a
    fraction of the steps training from scratch took."""
    expert_dir = Path(expert_dir)
    full = not (expert_dir / "adapter_config.json").is_file()
    dev = resolve_device(device)
    if full:  # the rebased fine-tune is the model: float32 masters, as train_expert keeps them
        model, tok = base_model.load(expert_dir, dtype=torch.float32, device=dev)
    else:
        from peft import PeftModel

        model, tok = base_model.load(base, device=dev)
        model = PeftModel.from_pretrained(model, expert_dir, is_trainable=True)  # adapter weights in float32
        model.to(model_device(model))
    kind = "full" if full else (read_card(expert_dir).get("adapter") or "lora")
    done, most = 0, most or steps
    while done < most:
        k = min(steps, most - done)
        stats = train(model, tok, rows, steps=k, lr=lr or DEFAULT_LR.get(kind, DEFAULT_LR["lora"]),
                      batch_size=batch_size, seed=seed + done)
        done += k
        if stop is None or stop(model, tok):  # train() leaves the model in eval mode: stop may generate
            break
    model.save_pretrained(expert_dir)  # over the carried weights, in the caller's scratch folder
    return done, stats.final_loss


def embed_expert(expert_dir: str | os.PathLike, embedder: str | os.PathLike | None = None, *,
                 prompts: list[str] | None = None, base: str | os.PathLike | None = None) -> dict:
    """Record task centroids in an expert's card, so task-level routers can route to it without its
    data: of ``prompts`` (else of the training data its card names), by the base model (``base``,
    default the card's base, else the built-in one) or by the sentence-embedding model ``embedder``. An adapter folder
    without a card (one downloaded from a hub) gets an ``expert.json`` holding just them."""
    expert_dir = Path(expert_dir)
    if not expert_dir.is_dir():
        raise MoergeError(f"{expert_dir}: no such expert folder")
    path = expert_dir / CARD
    data = read_card(expert_dir)
    if prompts is None:
        if not data:
            raise MoergeError(f"{expert_dir}: has no {CARD} saying what it was trained on; give its prompts with --prompts FILE")
        prompts = [r.prompt for r in training_rows(ExpertCard.read(expert_dir))]
    if base is None and data.get("base") and Path(data["base"]).is_dir():
        base = data["base"]  # a trained expert's own base
    updated, entry = with_task_embedding(data, prompts, base=base, embedder=embedder)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(updated, indent=2) + "\n")
    return entry
