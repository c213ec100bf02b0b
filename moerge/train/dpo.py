"""Preference tuning after merging: DPO with TRL (``moerge tune dpo``).

A merge keeps its inputs' skills only in part; the last step of the seed talk's recipe tunes the
merged model on preferences (an answer preferred over another for the same prompt). TRL's
``DPOTrainer`` does the tuning; moerge brings what it does for every expert: its data checked line by
line, held-out pairs scored before and after, the output written atomically as an adapter (LoRA by
default) of the tuned model with an expert card, so it can be evaluated, routed to, put in the
library, or merged back (``MODEL+ADAPTER`` in a recipe).

Sequences are the ones moerge trains experts on (``train.loop.encode``): bos + prompt (the tokenizer
given to TRL adds bos itself, ``bos_tokenizer``), or the chat template for a chat model (TRL renders
conversational pairs with it), then the answer and eos.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.experts.card import ADAPTERS, ALIASES, ExpertCard
from moerge.experts.embed import task_centroids
from moerge.io.fingerprint import folder_fingerprint
from moerge.lm import base as base_model
from moerge.lm.batching import completion_logps
from moerge.lm.chat import bos_tokenizer, uses_chat
from moerge.lm.generate import exact_match
from moerge.tasks.data import Example
from moerge.tasks.preferences import (
    Preference,
    preference_hash,
    read_preferences,
    split_preferences,
)
from moerge.train.expert import DEFAULT_LR, peft_config
from moerge.util.files import atomic_dir, check_output_dir
from moerge.util.progress import progress_bar, quiet_transformers

MIN_PAIRS = 20  # as for an expert's data: enough to train on and still hold some out
# A tenth of expert training's rates: on the real model (bench/dpo_after_merge.py, README) LoRA DPO at
# expert training's 5e-3 left the model preferring the chosen answers but generating nothing right,
# and 5e-4 did better on every row of the table.
LR_SCALE = 0.1


def preference_accuracy(model, tokenizer, prefs: list[Preference]) -> float:
    """Share of pairs where the model gives the chosen answer a higher log-likelihood than the rejected."""
    if not prefs:
        return 0.0
    chosen = completion_logps(model, tokenizer, [Example(p.prompt, p.chosen) for p in prefs])
    rejected = completion_logps(model, tokenizer, [Example(p.prompt, p.rejected) for p in prefs])
    return float((chosen > rejected).float().mean())


def _dataset(prefs: list[Preference], tokenizer):
    from datasets import Dataset

    if uses_chat(tokenizer):  # conversational pairs: TRL renders them with the model's chat template
        return Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}],
                                   "chosen": [{"role": "assistant", "content": p.chosen}],
                                   "rejected": [{"role": "assistant", "content": p.rejected}]} for p in prefs])
    return Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in prefs])


def tune_dpo(
    out_dir: str | os.PathLike,
    *,
    data: str | os.PathLike,
    model: str | os.PathLike | None = None,
    adapter: str = "lora",
    steps: int = 100,
    lr: float | None = None,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    batch_size: int = 16,
    rank: int = 8,
    max_length: int = 512,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
):
    """DPO-tune ``model`` (a model folder such as a merge's output, a real base's name, or the built-in
    base) on the preference pairs in ``data``; write an adapter of it (or, with ``adapter="full"``, the
    tuned model) and its expert card to ``out_dir``. Returns the card; its ``extra["dpo"]`` holds the
    preference accuracy on the held-out pairs before and after."""
    adapter = ALIASES.get(adapter, adapter)
    if adapter not in ADAPTERS:
        raise MoergeError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")
    for name, value in (("steps", steps), ("batch-size", batch_size), ("rank", rank), ("max-length", max_length)):
        if value < 1:
            raise MoergeError(f"--{name} must be at least 1 (got {value})")
    if not beta > 0:
        raise MoergeError(f"--beta must be positive (got {beta}); DPO's usual value is 0.1")
    if lr is not None and not lr > 0:
        raise MoergeError(f"--lr must be positive (got {lr})")
    if not sft_weight >= 0:
        raise MoergeError(f"--sft-weight must be 0 or more (got {sft_weight}); 1.0 is RPO's")
    try:
        import trl
    except ImportError:
        raise MoergeError("DPO needs TRL: pip install 'moerge[dpo]'") from None
    prefs = read_preferences(data)
    if len(prefs) < MIN_PAIRS:
        raise MoergeError(f"{data}: has {len(prefs)} preference pairs; DPO here needs at least {MIN_PAIRS} to tune on and "
                          "hold some out (a few hundred are better)")
    train_prefs, held = split_preferences(prefs)
    if not train_prefs or not held:
        raise MoergeError(f"{data}: its {len(prefs)} prompts all fall in one split (about 1 in 5 is held out); "
                          "add pairs with other prompts")
    out = check_output_dir(out_dir, overwrite, inputs=(model, data))
    base_dir = base_model.resolve(model)
    base_model.check_model_folder(base_dir, "model")
    net, tok = base_model.load(base_dir, dtype=torch.float32)  # TRL's trainer runs as configured below: float32
    quiet_transformers()
    held_rows = [Example(p.prompt, p.chosen) for p in held]
    before = {"preference_accuracy": preference_accuracy(net, tok, held), "exact_match": exact_match(net, tok, held_rows)}
    centroid, centroids = task_centroids(net, tok, [p.prompt for p in train_prefs[:256]])
    lr = lr or DEFAULT_LR[adapter] * LR_SCALE
    torch.manual_seed(seed)

    from transformers import PrinterCallback, TrainerCallback

    class Progress(TrainerCallback):
        loss = float("nan")

        def on_log(self, args, state, control, logs=None, **kw):  # logged every step (logging_steps=1)
            if logs and "loss" in logs:
                Progress.loss = float(logs["loss"])
                advance(Progress.loss)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moerge-dpo-") as scratch, \
            progress_bar(progress, f"DPO ({adapter}) on {Path(data).name}", steps) as advance:
        import datasets

        datasets.disable_progress_bar()
        config = trl.DPOConfig(output_dir=scratch, use_cpu=not torch.cuda.is_available(), report_to="none",
                               save_strategy="no", max_steps=steps, per_device_train_batch_size=batch_size,
                               learning_rate=lr, beta=beta, max_length=max_length, logging_steps=1, disable_tqdm=True,
                               # RPO: DPO plus the chosen answers' negative log-likelihood, so pushing the rejected
                               # answers down cannot also drag the chosen ones (and generation) down with them
                               loss_type=["sigmoid", "sft"] if sft_weight else ["sigmoid"],
                               loss_weights=[1.0, sft_weight] if sft_weight else None,
                               seed=seed, data_seed=seed, bf16=False, fp16=False)
        try:
            trainer = trl.DPOTrainer(model=net, args=config, train_dataset=_dataset(train_prefs, tok),
                                     processing_class=bos_tokenizer(tok),
                                     peft_config=None if adapter == "full" else peft_config(adapter, rank, net),
                                     callbacks=[Progress()])
            trainer.remove_callback(PrinterCallback)  # it prints every step's log dict to stdout; ours is the bar
            result = trainer.train()
        except (ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise MoergeError(f"TRL's DPO could not tune {base_dir} on {data}: {first}") from None
    seconds = time.perf_counter() - start
    tuned = trainer.model.eval()
    after = {"preference_accuracy": preference_accuracy(tuned, tok, held), "exact_match": exact_match(tuned, tok, held_rows)}
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    with atomic_dir(out, overwrite) as tmp:
        tuned.save_pretrained(tmp)
        if adapter == "full":
            tok.save_pretrained(tmp)
        weights = [f for f in tmp.iterdir() if f.suffix in (".safetensors", ".bin")]
        card = ExpertCard(
            task=Path(data).stem, adapter=adapter, base=str(base_dir.absolute()), base_fingerprint=folder_fingerprint(base_dir),
            trainable_params=trainable, adapter_bytes=sum(f.stat().st_size for f in weights), data=str(Path(data).resolve()),
            data_sha256=preference_hash(train_prefs), examples=len(train_prefs), steps=steps, lr=lr, batch_size=batch_size,
            rank=rank if adapter in ("lora", "dora") else None, seed=seed, seconds=round(seconds, 1),
            final_loss=round(Progress.loss if Progress.loss == Progress.loss else float(result.training_loss), 4), validation_accuracy=after["exact_match"],
            centroid=centroid, centroids=centroids,
            extra={"tuning": "dpo", "dpo": {"beta": beta, "sft_weight": sft_weight, "held_out_pairs": len(held), "before": before, "after": after,
                                            "trl": trl.__version__}},
        )
        card.write(tmp)
    return card
