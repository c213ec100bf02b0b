"""A plain PyTorch training loop for causal LMs on prompt/completion pairs (no Trainer framework).

The loss covers the completion and the end-of-sequence token only (``lm.batching``): the prompt is
context, not something the model should learn to produce.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from moerge.lm.batching import collate, completion_loss, encode
from moerge.lm.device import model_device, to_device
from moerge.lm.example import Example
from moerge.lm.precision import autocast_for


@dataclass
class TrainStats:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float]


def train(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[Example],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """AdamW with linear warmup and cosine decay over the trainable parameters; seeded batches. A model
    whose frozen weights are bf16 trains under bf16 autocast (``moerge.lm.precision``)."""
    if not rows:
        raise ValueError("no training examples")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = encode(tokenizer, rows)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / n_warm if s < n_warm else 0.5 * (1 + math.cos(math.pi * (s - n_warm) / max(1, steps - n_warm))))
    autocast = autocast_for(model)  # bf16 frozen weights: mixed precision, float32 adapter weights and loss
    device = model_device(model)  # batches are made on the CPU and sent where the model is
    model.train()
    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        batch = to_device(collate([encoded[i] for i in order[:batch_size]], tokenizer.pad_token_id), device)
        del order[:batch_size]
        with autocast:
            loss = completion_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return TrainStats(steps, time.perf_counter() - start, sum(tail) / len(tail), losses)
