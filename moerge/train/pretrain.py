"""Pretraining the built-in tiny base (``moerge base build``): a character-level Llama taught the
pretraining skills (copy, double, rotations, halves, interleave), so that experts start from a model
that copies and must learn each skill; saved atomically with its card."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from moerge.io.fingerprint import folder_fingerprint
from moerge.lm.base import CARD, CONFIG, PRETRAIN_LR, PRETRAIN_STEPS, cache_dir
from moerge.lm.generate import exact_match
from moerge.lm.tiny import save_char_tokenizer, tiny_config
from moerge.tasks import EXPERTS, PRETRAIN, examples, mixture
from moerge.train.loop import train
from moerge.util.files import atomic_dir
from moerge.util.progress import progress_bar, quiet_transformers


def build_base(out_dir: str | Path | None = None, *, seed: int = 0, steps: int = PRETRAIN_STEPS,
               overwrite: bool = False, progress: bool = True) -> Path:
    """Pretrain the tiny base and save it (model, tokenizer, card) atomically into ``out_dir``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    quiet_transformers()
    out = Path(out_dir) if out_dir else cache_dir() / "base"
    with atomic_dir(out, overwrite) as tmp:
        save_char_tokenizer(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(**CONFIG))
        rows = mixture(PRETRAIN, "train", 2000, seed=seed)
        start = time.perf_counter()
        with progress_bar(progress, "pretraining base", steps) as advance:
            stats = train(model, tok, rows, steps=steps, lr=PRETRAIN_LR, seed=seed, on_step=lambda s, loss: advance(loss))
        scores = {t: exact_match(model, tok, examples(t, "validation", 100)) for t in PRETRAIN + EXPERTS}
        model.save_pretrained(tmp)
        card = {
            "kind": "moerge tiny base", "seed": seed, "steps": steps, "lr": PRETRAIN_LR, "config": CONFIG,
            "pretrain_tasks": list(PRETRAIN), "final_loss": round(stats.final_loss, 4),
            "seconds": round(time.perf_counter() - start, 1), "validation_accuracy": scores,
            "torch": torch.__version__, "fingerprint": folder_fingerprint(tmp),
        }
        (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return out
