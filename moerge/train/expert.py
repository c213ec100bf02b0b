"""Training a specialist expert from a base: a PEFT adapter (LoRA, DoRA, (IA)³) or a full fine-tune.

The output is what the rest of the ecosystem already reads: an adapter folder that
``PeftModel.from_pretrained`` loads (or, for a full fine-tune, a model folder), plus ``expert.json``,
the expert card that the library and the routers rely on: the task, the base's fingerprint (so an
expert is never applied to another base), the adapter kind and size, a hash of the data, the
training settings and the validation accuracy.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from moerge.errors import MoergeError

ADAPTERS = ("lora", "dora", "ia3", "none")
# learning rates that train the built-in skills in a few hundred steps (see README: Experts)
DEFAULT_LR = {"lora": 5e-3, "dora": 5e-3, "ia3": 3e-2, "none": 1e-3}
CARD = "expert.json"


@dataclass
class ExpertCard:
    task: str
    adapter: str
    base: str
    base_fingerprint: str
    trainable_params: int
    adapter_bytes: int
    data: str
    data_sha256: str
    examples: int
    steps: int
    lr: float
    batch_size: int
    rank: int | None
    seed: int
    seconds: float
    final_loss: float
    validation_accuracy: float | None
    centroid: list[float] | None = None  # mean base embedding of training prompts (task-level routing)
    centroids: list[list[float]] | None = None  # k-means centroids of those embeddings (one per cluster)
    embeddings: dict = field(default_factory=dict)  # sentence-embedding model id -> {model, centroid, centroids}
    extra: dict = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        (folder / CARD).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "ExpertCard":
        path = Path(folder) / CARD
        if not path.is_file():
            raise MoergeError(f"{folder}: has no {CARD}; train it with `moerge expert train` or add a card")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        extra = dict(data.pop("extra", {}) or {}) | {k: data.pop(k) for k in list(data) if k not in known}
        try:
            return cls(**data, extra=extra)
        except TypeError as e:
            raise MoergeError(f"{path}: not a complete expert card ({e})") from None


def peft_config(adapter: str, rank: int = 8):
    """All linear layers: on tiny models, attention-only adapters barely learn a new skill."""
    from peft import IA3Config, LoraConfig

    if adapter in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                          use_dora=adapter == "dora", task_type="CAUSAL_LM")
    if adapter == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")
    raise MoergeError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")


def _data_hash(rows) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.prompt, r.completion]).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def _split_user_data(rows):
    """Users' JSONL: hold out the rows whose prompt hashes to validation/test, train on the rest."""
    from moerge.tasks.data import split_of

    train = [r for r in rows if split_of(r.prompt) == "train"]
    val = [r for r in rows if split_of(r.prompt) != "train"]
    return (train, val) if train else (rows, [])


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
    seed: int = 0,
    embedder: str | os.PathLike | None = None,
    gate_steps: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> ExpertCard:
    """Train one expert on a built-in task or a JSONL file and save it atomically into ``out_dir``;
    with ``gate_steps`` also its PHATGOOSE gates (expert frozen), and with ``embedder`` the task
    centroids of a sentence-embedding model."""
    from moerge import base as base_model
    from moerge.eval.generate import exact_match
    from moerge.io.fingerprint import folder_fingerprint
    from moerge.tasks import mixture, read_jsonl
    from moerge.train.loop import train
    from moerge.util import atomic_dir, progress_bar

    if (task is None) == (data is None):
        raise MoergeError("give exactly one of --task NAME or --data FILE.jsonl")
    if adapter not in ADAPTERS:
        raise MoergeError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")
    if gate_steps and adapter == "none":
        raise MoergeError("--gate-steps: PHATGOOSE gates route adapters; a full fine-tune (--adapter none) is merged, not routed")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MoergeError(f"{out}: already exists; pass --overwrite or choose another folder")
    if task is not None:
        names = [t.strip() for t in task.split(",") if t.strip()]  # several: a multitask expert
        train_rows = mixture(names, "train", max(1, n_train // len(names)) * (1 if len(names) == 1 else 2), seed)
        val_rows = mixture(names, "validation", max(20, 100 // len(names)), seed)
        task, source = ",".join(names), "moerge:" + ",".join(names)
    else:
        train_rows, val_rows = _split_user_data(read_jsonl(data))
        task, source = Path(data).stem, str(data)
    base_dir = Path(base) if base else base_model.default_base()
    model, tok = base_model.load(base_dir)
    from moerge.routing.embed import SentenceEmbedder, record_embedding, task_centroids

    prompts = [r.prompt for r in train_rows[:256]]
    centroid, centroids = task_centroids(model, tok, prompts)
    embeddings = record_embedding({}, SentenceEmbedder(embedder), prompts)["embeddings"] if embedder else {}
    torch.manual_seed(seed)
    if adapter == "none":
        model.train()
    if adapter != "none":
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(adapter, rank))
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
        if adapter == "none":
            tok.save_pretrained(tmp)
        weights = [f for f in tmp.iterdir() if f.suffix in (".safetensors", ".bin")]
        card = ExpertCard(
            task=task, adapter=adapter, base=str(base_dir), base_fingerprint=folder_fingerprint(base_dir),
            trainable_params=trainable, adapter_bytes=sum(f.stat().st_size for f in weights), data=source,
            data_sha256=_data_hash(train_rows), examples=len(train_rows), steps=steps, lr=lr, batch_size=batch_size,
            rank=rank if adapter in ("lora", "dora") else None, seed=seed, seconds=round(seconds, 1),
            final_loss=round(stats.final_loss, 4), validation_accuracy=val, centroid=centroid, centroids=centroids,
            embeddings=embeddings,
        )
        card.write(tmp)
    if gate_steps and adapter != "none":
        from moerge.routing.routers.phatgoose import train_gates

        train_gates(out, base=base_dir, steps=gate_steps, seed=seed, progress=progress)
    return card


def load_expert(base_dir: str | os.PathLike | None, expert_dir: str | os.PathLike):
    """(model, tokenizer): the base with the expert applied, after checking the expert was made for
    this base (fingerprints must match)."""
    from moerge import base as base_model
    from moerge.io.fingerprint import folder_fingerprint

    expert_dir = Path(expert_dir)
    card = ExpertCard.read(expert_dir)
    if card.adapter == "none":
        return base_model.load(expert_dir)
    base_dir = Path(base_dir) if base_dir else base_model.default_base()
    actual = folder_fingerprint(base_dir)
    if actual != card.base_fingerprint:
        raise MoergeError(
            f"{expert_dir}: was trained on a base with fingerprint {card.base_fingerprint}, but {base_dir} has {actual};"
            " use the expert's own base (see its expert.json)")
    from peft import PeftModel

    model, tok = base_model.load(base_dir)
    return PeftModel.from_pretrained(model, expert_dir).eval(), tok


def training_rows(card: ExpertCard, n: int = 1000, seed: int = 0) -> list:
    """Examples of the data an expert was trained on, from its card (built-in tasks are regenerated)."""
    from moerge.tasks import mixture, read_jsonl

    if card.data.startswith("moerge:"):
        return mixture(card.task.split(","), "train", n, seed)
    if not Path(card.data).is_file():
        raise MoergeError(f"the expert's training data {card.data} is not here; run this where the expert was trained")
    return read_jsonl(card.data)


def embed_expert(expert_dir: str | os.PathLike, embedder: str | os.PathLike | None = None, *,
                 prompts: list[str] | None = None, base: str | os.PathLike | None = None) -> dict:
    """Record task centroids in an expert's card, so task-level routers can route to it without its
    data: of ``prompts`` (else of the training data its card names), by the base model (``base``,
    default the card's base, else the built-in one) or by the sentence-embedding model ``embedder``. An adapter folder
    without a card (one downloaded from a hub) gets an ``expert.json`` holding just them."""
    from moerge.routing.embed import with_task_embedding
    from moerge.util import atomic_file

    expert_dir = Path(expert_dir)
    if not expert_dir.is_dir():
        raise MoergeError(f"{expert_dir}: no such expert folder")
    path = expert_dir / CARD
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise MoergeError(f"{path}: not JSON ({e.msg}); fix or delete it") from None
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
