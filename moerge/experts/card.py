"""The expert card (``expert.json``): what moerge knows of an expert, written beside its weights.

Training fills every field; extraction and combination fill those that apply; a card written for a hub
adapter may hold only its routing signature (task centroids). The library, the merge engine, the
routers and the server all read it, which is why it lives here, below all of them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from moerge.errors import MoergeError
from moerge.io.fingerprint import folder_fingerprint
from moerge.io.known_bases import KNOWN, cached
from moerge.lm.base import default_base

ADAPTERS = ("lora", "dora", "ia3", "full")  # "full": a full fine-tune, the one name across train, library and docs
ALIASES = {"none": "full", "dense": "full"}  # earlier names of a full fine-tune, still accepted
CARD = "expert.json"


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
    dtype: str | None = None  # what the base computed in while training (moerge.lm.precision): bfloat16 or float32
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


def recorded_base(folder: str | os.PathLike, give: str = "give that base") -> Path | None:
    """The base an expert says it was made on, found here: the folder its card names, else the built-in
    base or a fetched real base with the card's ``base_fingerprint`` (the cache moved, another machine),
    else PEFT's ``base_model_name_or_path`` when that is a folder here. None when nothing says; one line
    when the card names a base that is not here (ending in ``give``: how the command takes a base),
    rather than a silent fall back to another base."""
    card = read_card(folder)
    named = card.get("base")
    if named and Path(named).is_dir():
        return Path(named)
    want = card.get("base_fingerprint")
    if want:
        for candidate in [default_base(), *(cached(k) for k in KNOWN)]:
            if candidate is not None and folder_fingerprint(candidate) == want:
                return candidate
    if named or want:
        raise MoergeError(f"{folder}: its card says it was made on {named or 'a base with fingerprint ' + want[:19]}, "
                          f"which is not here; {give}")
    peft = Path(folder) / "adapter_config.json"
    if peft.is_file():
        try:
            origin = json.loads(peft.read_text()).get("base_model_name_or_path")
        except (json.JSONDecodeError, AttributeError):
            origin = None  # a malformed config is reported where the adapter is read
        if origin and Path(origin).is_dir():
            return Path(origin)
    return None


# ---------------------------------------------------------------- a card for people to read

INLINE = 8  # numeric lists up to this long are printed as they are


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def card_value(key: str, v) -> str:
    """A card value on one line: long numeric lists (and lists of them) by their shape."""
    if isinstance(v, list):
        if v and all(isinstance(r, list) and r and all(_number(x) for x in r) for r in v):
            dims = {len(r) for r in v}
            d = dims.pop() if len(dims) == 1 else f"{min(len(r) for r in v)}-{max(len(r) for r in v)}"
            noun = "centroids" if "centroid" in key else "rows"
            return f"<{len(v)} {noun} x {d} dims>"
        if v and all(_number(x) for x in v) and len(v) > INLINE:
            return f"<{len(v)} dims>" if "centroid" in key else f"<{len(v)} numbers>"
        if all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
            return ", ".join(map(str, v)) or "-"
    if isinstance(v, float) and key in ("added", "created"):
        return when(v)
    if isinstance(v, (dict, list)):
        text = json.dumps(v)
        return text if len(text) <= 120 else text[:117] + "..."
    return "-" if v is None else str(v)


def card_lines(card: dict, indent: str = "") -> list[str]:
    """A card as readable lines: nested fields indented, centroids and other long numeric lists by their
    shape (``<8 centroids x 128 dims>``): printed whole they are thousands of lines of floats."""
    lines = []
    width = max((len(k) for k in card), default=0)
    for key, v in card.items():
        if isinstance(v, dict) and v:
            lines.append(f"{indent}{key}:")
            lines += card_lines(v, indent + "  ")
        else:
            lines.append(f"{indent}{key.ljust(width)}  {card_value(key, v) if v != {} else '-'}")
    return lines


def describe_expert(folder: str | os.PathLike) -> tuple[dict, list[str]]:
    """(the card as stored, readable lines about it): what ``moerge expert show`` prints. A partial card
    (a hub adapter given task centroids by ``expert embed``) is shown as it is."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not an expert folder" if folder.exists() else "no such expert folder"
        raise MoergeError(f"{folder}: {what}; give the folder that holds expert.json and the adapter")
    card = read_card(folder)
    if not card:
        raise MoergeError(f"{folder}: has no {CARD}; train it with `moerge expert train`, or give a hub adapter one "
                          "with `moerge expert embed`")
    files = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    lines = [f"expert  {folder}", f"files   {', '.join(files) or '-'}"]
    lines += ["card:"] + card_lines(card, "  ")
    lines.append(f"(the whole card{', centroids included' if 'centroid' in card else ''}: moerge expert show {folder} --json)")
    return card, lines
