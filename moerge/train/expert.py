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

ADAPTERS = ("lora", "dora", "ia3", "full")  # "full": a full fine-tune, the one name across train, library and docs
ALIASES = {"none": "full", "dense": "full"}  # earlier names of a full fine-tune, still accepted
# learning rates that train the built-in skills in a few hundred steps (see README: Experts)
DEFAULT_LR = {"lora": 5e-3, "dora": 5e-3, "ia3": 3e-2, "full": 1e-3}
CARD = "expert.json"
MIN_EXAMPLES = 20  # below this, a JSONL file cannot train an expert and still leave rows to validate it on


def read_card(folder: str | os.PathLike) -> dict:
    """The raw ``expert.json`` of a folder as a dict ({} when there is none); malformed is one line."""
    path = Path(folder) / CARD
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoergeError(f"{path}: not JSON ({e.msg} at line {e.lineno}); fix or delete it") from None
    if not isinstance(data, dict):
        raise MoergeError(f"{path}: not a JSON object; fix or delete it")
    return data


@dataclass
class ExpertCard:
    """What moerge knows of an expert. ``expert train`` fills every field; ``expert extract`` and
    ``expert combine`` fill those that apply (their data and training fields stay None); a card that
    ``expert embed`` wrote for a hub adapter may hold only task centroids. So every field is optional,
    and what needs a field checks it (``require``)."""

    task: str | None = None
    adapter: str | None = None  # lora | dora | ia3 | full (a full fine-tune)
    base: str | None = None
    base_fingerprint: str | None = None
    trainable_params: int | None = None
    adapter_bytes: int | None = None
    data: str | None = None  # "moerge:<tasks>" for built-in skills, else the file's absolute path
    data_sha256: str | None = None
    examples: int | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    rank: int | None = None
    seed: int | None = None
    seconds: float | None = None
    dtype: str | None = None  # what the base computed in while training (moerge.precision): bfloat16 or float32
    final_loss: float | None = None
    validation_accuracy: float | None = None
    centroid: list[float] | None = None  # mean base embedding of training prompts (task-level routing)
    centroids: list[list[float]] | None = None  # k-means centroids of those embeddings (one per cluster)
    embeddings: dict = field(default_factory=dict)  # sentence-embedding model id -> {model, centroid, centroids}
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.adapter = ALIASES.get(self.adapter, self.adapter)  # cards written before "full" was the name

    def write(self, folder: Path) -> None:
        (folder / CARD).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "ExpertCard":
        if not (Path(folder) / CARD).is_file():
            raise MoergeError(f"{folder}: has no {CARD}; train it with `moerge expert train`, or give what the command "
                              "asks for (e.g. --prompts, --data) for an adapter without a card")
        data = read_card(folder)
        known = {f.name for f in fields(cls)}
        extra = dict(data.pop("extra", {}) or {}) | {k: data.pop(k) for k in list(data) if k not in known}
        return cls(**data, extra=extra)

    @classmethod
    def read_or_empty(cls, folder: str | os.PathLike) -> "ExpertCard":
        """The card, or an empty one for an adapter without ``expert.json`` (a plain PEFT folder)."""
        return cls.read(folder) if (Path(folder) / CARD).is_file() else cls()


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
    n_val: int = 100,
    seed: int = 0,
    embedder: str | os.PathLike | None = None,
    gate_steps: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> ExpertCard:
    """Train one expert on a built-in task or a JSONL file and save it atomically into ``out_dir``;
    with ``gate_steps`` also its PHATGOOSE gates (expert frozen), and with ``embedder`` the task
    centroids of a sentence-embedding model. ``n_val``: validation examples of a built-in task (at
    least 20 per task), generated and scored after training."""
    from moerge import base as base_model
    from moerge.eval.generate import exact_match
    from moerge.io.fingerprint import folder_fingerprint
    from moerge.tasks import mixture, read_jsonl
    from moerge.train.loop import train
    from moerge.util import atomic_dir, check_output_dir, progress_bar

    if (task is None) == (data is None):
        raise MoergeError("give exactly one of --task NAME or --data FILE.jsonl")
    adapter = ALIASES.get(adapter, adapter)
    if adapter not in ADAPTERS:
        raise MoergeError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")
    if gate_steps and adapter == "full":
        raise MoergeError("--gate-steps: PHATGOOSE gates route adapters; a full fine-tune (--adapter full) is merged, not routed")
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
        train_rows, val_rows = _split_user_data(rows)
        if not val_rows:
            raise MoergeError(f"{data}: none of its {len(rows)} prompts falls in the validation split (about 1 in 5 does), "
                              "so the expert could not be validated; add more examples")
        # the card pins the data by absolute path and hash, so it is found (and checked) from any folder
        task, source = Path(data).stem, str(Path(data).resolve())
    base_dir = base_model.resolve(base)
    # a full fine-tune's weights are what the optimizer updates: float32 masters whatever the checkpoint's dtype;
    # an adapter trains in float32 over a bf16 base where the CPU multiplies bf16 natively (moerge.precision)
    model, tok = base_model.load(base_dir, dtype=torch.float32 if adapter == "full" else None)
    computed_in = str(next(model.parameters()).dtype).removeprefix("torch.")
    from moerge.routing.embed import SentenceEmbedder, record_embedding, task_centroids

    prompts = [r.prompt for r in train_rows[:256]]
    centroid, centroids = task_centroids(model, tok, prompts)
    embeddings = record_embedding({}, SentenceEmbedder(embedder), prompts)["embeddings"] if embedder else {}
    torch.manual_seed(seed)
    if adapter == "full":
        model.train()
    else:
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
        if adapter == "full":
            tok.save_pretrained(tmp)
        weights = [f for f in tmp.iterdir() if f.suffix in (".safetensors", ".bin")]
        card = ExpertCard(
            task=task, adapter=adapter, base=str(base_dir.absolute()), base_fingerprint=folder_fingerprint(base_dir),
            trainable_params=trainable, adapter_bytes=sum(f.stat().st_size for f in weights), data=source,
            data_sha256=_data_hash(train_rows), examples=len(train_rows), steps=steps, lr=lr, batch_size=batch_size,
            rank=rank if adapter in ("lora", "dora") else None, seed=seed, seconds=round(seconds, 1), dtype=computed_in,
            final_loss=round(stats.final_loss, 4), validation_accuracy=val, centroid=centroid, centroids=centroids,
            embeddings=embeddings,
        )
        card.write(tmp)
    if gate_steps and adapter != "full":
        from moerge.routing.routers.phatgoose import train_gates

        train_gates(out, base=base_dir, steps=gate_steps, seed=seed, progress=progress)
    return card


def load_expert(base_dir: str | os.PathLike | None, expert_dir: str | os.PathLike):
    """(model, tokenizer): the base with the expert applied. Any PEFT adapter folder is accepted, with
    or without ``expert.json``; it is first checked against the base (``check_base``: the card's base
    fingerprint or PEFT's ``base_model_name_or_path``, then every tensor's name and shape), so a
    wrong base is one clear line, not a PEFT traceback. A full fine-tune (a model folder) loads as is."""
    from moerge import base as base_model
    from moerge.experts.peft_format import load_adapter
    from moerge.io.source import open_source

    expert_dir = Path(expert_dir)
    if not expert_dir.is_dir():
        raise MoergeError(f"{expert_dir}: no such expert folder; check the path")
    if not (expert_dir / "adapter_config.json").is_file():
        if (expert_dir / "config.json").is_file():  # a full fine-tune is a model of its own
            return base_model.load(expert_dir)
        raise MoergeError(f"{expert_dir}: neither a PEFT adapter (no adapter_config.json) nor a model folder (no config.json)")
    base_dir = base_model.resolve(base_dir)
    base_model.check_model_folder(base_dir, "base model")
    load_adapter(expert_dir, open_source(base_dir))  # the base check, and a truncated or mismatched adapter
    from peft import PeftModel

    model, tok = base_model.load(base_dir)
    try:
        return PeftModel.from_pretrained(model, expert_dir).eval(), tok
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MoergeError(f"{expert_dir}: PEFT cannot load it on {base_dir} ({first}); check it is a PEFT adapter of this base") from None


def training_rows(card: ExpertCard, n: int = 1000, seed: int = 0) -> list:
    """Examples of the data an expert was trained on, from its card (built-in tasks are regenerated)."""
    from moerge.tasks import mixture, read_jsonl

    if not card.data:
        raise MoergeError("the expert's card names no training data (it was not trained by `moerge expert train`); "
                          "give examples of its task (--data FILE or --prompts FILE)")
    if card.data.startswith("moerge:"):
        return mixture(card.task.split(","), "train", n, seed)
    if not Path(card.data).is_file():
        raise MoergeError(f"the expert's training data {card.data} is not here; give examples of its task (--data FILE "
                          "or --prompts FILE)")
    if card.extra.get("tuning") == "dpo":  # preference pairs: their prompts with the chosen answers
        from moerge.train.dpo import chosen_rows

        return chosen_rows(card)
    rows = read_jsonl(card.data)
    if card.data_sha256 and _data_hash(_split_user_data(rows)[0]) != card.data_sha256:
        raise MoergeError(f"{card.data}: changed since the expert was trained on it (its hash differs from the card's "
                          f"{card.data_sha256[:19]}...); give its original data (--data FILE or --prompts FILE)")
    return rows


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
