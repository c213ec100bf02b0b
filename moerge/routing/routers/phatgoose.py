"""PHATGOOSE (Muqeeth et al. 2024): per-token, per-layer routing by gates trained after the fact.

Each expert gets, at every module it adapts, a gate vector g trained on the expert's own data with
the expert and the base frozen: during that training the expert's update is scaled per token by
sigmoid(⟨x, g⟩), so g learns which inputs the expert is for. At inference, gate vectors and token
activations are both standardised (zero mean, unit variance over features), a token's score for an
expert is their dot product, and the top k scores go through a softmax. Gates are stored beside the
adapter (``gates.safetensors``), so routing needs no access to the data later.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moerge.errors import MoergeError
from moerge.experts.card import ExpertCard
from moerge.experts.peft_format import load_adapter
from moerge.io.source import open_source
from moerge.library.store import library_origin
from moerge.lm import base as base_model
from moerge.routing.attach import attach
from moerge.routing.mixture import RoutingState
from moerge.routing.registry import TokenRouter, absent_mask, register, top_k_softmax
from moerge.tasks.training_data import training_rows
from moerge.train.loop import train
from moerge.util.files import atomic_file
from moerge.util.progress import progress_bar

GATES = "gates.safetensors"


def _standardise(v: torch.Tensor) -> torch.Tensor:
    return (v - v.mean(-1, keepdim=True)) / v.std(-1, keepdim=True).clamp(min=1e-6)


class _GateTrainer(nn.Module):
    """The base with one expert attached and trainable gates: what the plain training loop optimises."""

    def __init__(self, model, layers: dict, state):
        super().__init__()
        self.model, self.state = model, state  # the model is frozen; only the gates are parameters here
        self.keys = {m: m.replace(".", "__") for m in layers}
        self.gates = nn.ParameterDict({k: nn.Parameter(torch.zeros(layers[m].in_features)) for m, k in self.keys.items()})

    def route(self, module: str, x: torch.Tensor, scores=None) -> torch.Tensor:
        return torch.sigmoid(x @ self.gates[self.keys[module]].to(x.dtype)).unsqueeze(-1)

    def get_base_model(self):
        return self.model  # what the training loop asks of a wrapper (it passes keywords through)

    def forward(self, **batch):
        self.state.token_router = self.route
        try:
            return self.model(**batch)
        finally:
            self.state.token_router = None


def train_gates(expert_dir: str | os.PathLike, *, base: str | os.PathLike | None = None, steps: int = 100, lr: float = 1e-2,
                batch_size: int = 32, seed: int = 0, progress: bool = False, rows: list | None = None) -> dict[str, torch.Tensor]:
    """Train and save an expert's gates (``gates.safetensors`` in its folder) on ``rows`` (prompt and
    completion examples of its task), else on the training data its card names. An adapter from a
    hub has no card: give its task's examples."""
    from safetensors.torch import save_file

    expert_dir = Path(expert_dir)
    if rows is None:
        if not (expert_dir / "expert.json").is_file() and expert_dir.is_dir():
            raise MoergeError(f"{expert_dir}: has no expert.json saying what it was trained on; give examples of its task "
                              "with --data FILE (JSONL of prompt/completion)")
        card = ExpertCard.read(expert_dir)
        rows = training_rows(card, 1000, seed)
        base = base or (card.base if Path(card.base).is_dir() else None)
    if not rows:
        raise MoergeError("PHATGOOSE gates need some examples of the expert's task")
    base_dir = base_model.resolve(base)
    model, tok = base_model.load(base_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    state = RoutingState()
    layers = attach(model, [load_adapter(expert_dir, open_source(base_dir))], state)
    trainer = _GateTrainer(model, layers, state)
    with progress_bar(progress, f"training gates: {expert_dir.name}", steps) as advance:
        train(trainer, tok, rows, steps=steps, lr=lr, batch_size=batch_size, seed=seed, on_step=lambda s, loss: advance(loss))
    gates = {m: trainer.gates[k].detach().clone().contiguous() for m, k in trainer.keys.items()}
    with atomic_file(expert_dir / GATES) as tmp:
        save_file(gates, tmp, metadata={"steps": str(steps), "lr": str(lr)})
    return gates


def load_gates(card: dict) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    if card.get("gates") is not None:
        return card["gates"]
    path = card.get("gates_path")
    return load_file(path) if path and Path(path).is_file() else None


def _no_gates(card: dict) -> str:
    """What to run when an expert has no PHATGOOSE gates (a library copy gets them only by a re-add)."""
    name = card.get("name", "?")
    origin = library_origin(card)
    if origin:
        lib_name, src = origin
        data = "" if card.get("data") else " --data FILE"  # a card naming its training data needs no examples
        return (f"expert {name} has no gates in the library; train them on the folder it was added from, then add it again: "
                f"`moerge expert gate {src}{data}`" + (" (examples of its task)" if data else "")
                + f", then `moerge library add {src} --name {lib_name}`")
    folder = Path(card["gates_path"]).parent if card.get("gates_path") else "DIR"
    return (f"expert {name} has no gates; train them with `moerge expert gate {folder}` (add --data FILE, examples of its "
            "task, if it has no expert.json naming its training data)")


@register
class PhatgooseRouter(TokenRouter):
    name = "phatgoose"
    help = "PHATGOOSE: per-token standardised <h, gate_e> with gates trained post hoc per expert, top-k softmax"

    def __init__(self, top_k: int | None = 2, temperature: float = 1.0):
        super().__init__(top_k, temperature)

    def fit(self, routed) -> None:
        gates = []
        for card in routed.cards:
            g = load_gates(card)
            if g is None:
                raise MoergeError(_no_gates(card))
            gates.append(g)
        self.gates: dict[str, torch.Tensor] = {}
        self.absent: dict[str, torch.Tensor | None] = {}
        for module, layer in routed.layers.items():
            dim = layer.in_features
            rows = [g.get(module, torch.zeros(dim)) for g in gates]
            self.gates[module] = _standardise(torch.stack(rows).float())
            self.absent[module] = absent_mask([module in g for g in gates])

    def score_map(self, module: str) -> torch.Tensor:
        return self.gates[module].T

    def token_weights(self, module: str, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        # the gates are standardised (zero mean), so standardising x reduces to dividing by its std
        if scores is None:
            scores = x @ self.gates[module].T.to(x.device, x.dtype)
        scores = scores.float() / (x.float().std(-1, keepdim=True).clamp(min=1e-6) * x.shape[-1] ** 0.5)
        return top_k_softmax(scores, self.top_k, self.temperature, self.absent[module]).to(x.dtype)
