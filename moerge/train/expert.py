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
from moerge.lm.arch import ia3_modules
from moerge.lm.device import model_device
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
    skill); (IA)³ on the keys, values and feed-forward layers of ``model``'s family (``lm.arch``)."""
    from peft import IA3Config, LoraConfig

    if adapter in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                          use_dora=adapter == "dora", task_type="CAUSAL_LM")
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
) -> ExpertCard:
    """Train one expert on a built-in task or a JSONL file and save it atomically into ``out_dir``,
    with its card; with ``embedder`` also the task centroids of a sentence-embedding model (those of
    the base are always recorded). PHATGOOSE gates are trained afterwards (``moerge.api.train_expert``).
    ``n_val``: validation examples of a built-in task (at least 20 per task), generated and scored
    after training."""
    if (task is None) == (data is None):
        raise MoergeError("give exactly one of --task NAME or --data FILE.jsonl")
    adapter = ALIASES.get(adapter, adapter)
    if adapter not in ADAPTERS:
        raise MoergeError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")
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
                                 device=resolve_device(device))
    computed_in = str(next(model.parameters()).dtype).removeprefix("torch.")

    prompts = [r.prompt for r in train_rows[:256]]
    centroid, centroids = task_centroids(model, tok, prompts)
    embeddings = record_embedding({}, SentenceEmbedder(embedder), prompts)["embeddings"] if embedder else {}
    torch.manual_seed(seed)
    if adapter == "full":
        model.train()
    else:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(adapter, rank, model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = lr or DEFAULT_LR[adapter]
    start = time.perf_counter()
    with progress_bar(progress, f"training {adapter} expert: {task}", steps) as advance:
        stats = train(model, tok, train_rows, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                      on_step=lambda s, loss: advance(loss))
    seconds = time.perf_counter() - start
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
        )
        card.write(tmp)
    return card


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
            return base_model.load(expert_dir, device=device)
        raise MoergeError(f"{expert_dir}: neither a PEFT adapter (no adapter_config.json) nor a model folder (no config.json)")
    base_dir = base_model.resolve(base_dir if base_dir is not None else recorded_base(expert_dir, "give that base"))
    base_model.check_model_folder(base_dir, "base model")
    load_adapter(expert_dir, open_source(base_dir))  # the base check, and a truncated or mismatched adapter
    from peft import PeftModel

    model, tok = base_model.load(base_dir, device=device)
    try:
        return PeftModel.from_pretrained(model, expert_dir).to(model_device(model)).eval(), tok
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MoergeError(f"{expert_dir}: PEFT cannot load it on {base_dir} ({first}); check it is a PEFT adapter of this base") from None


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
