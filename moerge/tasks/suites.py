"""Which skills a base is shown: the built-in suite for the tiny base, the real-model suite for a chat
model. The demo and fusion's simulation both start from here."""

from __future__ import annotations

from pathlib import Path

from moerge.lm.chat import uses_chat
from moerge.tasks import real
from moerge.tasks import skills as suite


def suite_for(base_dir: Path, quick: bool) -> tuple[str, list[str], list[str]]:
    """("tiny" or "real", default skills, held-out composites) for a base: a chat model (its tokenizer has
    a chat template, as ``moerge.lm.chat`` decides) gets the real-model suite."""
    from transformers import AutoTokenizer

    if not uses_chat(AutoTokenizer.from_pretrained(base_dir)):
        return "tiny", list(suite.QUICK_EXPERTS if quick else suite.EXPERTS), list(suite.QUICK_HELDOUT if quick else suite.HELDOUT)
    if quick:
        return "real", ["reverse_words", "caps", "acronym"], ["reverse_words_caps", "reverse_words_acronym"]
    return "real", list(real.EXPERTS), list(real.HELDOUT)
