"""The rows an expert was trained on, found again from its card: built-in skills are regenerated,
a user's JSONL is read back and checked against the hash the card recorded, a DPO expert's preference
pairs give their chosen answers. Data-aware merges, gate training and ``expert embed`` read them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moerge.errors import MoergeError
from moerge.experts.card import ExpertCard
from moerge.tasks.data import Example, mixture, read_jsonl, split_of
from moerge.tasks.preferences import (
    preference_hash,
    read_preferences,
    split_preferences,
)


def data_hash(rows) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.prompt, r.completion]).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def split_user_data(rows):
    """Users' JSONL: hold out the rows whose prompt hashes to validation/test, train on the rest."""
    train = [r for r in rows if split_of(r.prompt) == "train"]
    val = [r for r in rows if split_of(r.prompt) != "train"]
    return (train, val) if train else (rows, [])


def training_rows(card: ExpertCard, n: int = 1000, seed: int = 0) -> list:
    """Examples of the data an expert was trained on, from its card (built-in tasks are regenerated)."""
    if not card.data:
        raise MoergeError("the expert's card names no training data (it was not trained by `moerge expert train`); "
                          "give examples of its task (--data FILE or --prompts FILE)")
    if card.data.startswith("moerge:"):
        return mixture(card.task.split(","), "train", n, seed)
    if not Path(card.data).is_file():
        raise MoergeError(f"the expert's training data {card.data} is not here; give examples of its task (--data FILE "
                          "or --prompts FILE)")
    if card.extra.get("tuning") == "dpo":  # preference pairs: their prompts with the chosen answers
        return chosen_rows(card)
    rows = read_jsonl(card.data)
    if card.data_sha256 and data_hash(split_user_data(rows)[0]) != card.data_sha256:
        raise MoergeError(f"{card.data}: changed since the expert was trained on it (its hash differs from the card's "
                          f"{card.data_sha256[:19]}...); give its original data (--data FILE or --prompts FILE)")
    return rows


def chosen_rows(card) -> list:
    """A DPO expert's training prompts with their chosen answers: its data as prompt/completion rows
    (what data-aware merges and routers read from an expert's card)."""
    prefs = split_preferences(read_preferences(card.data))[0]
    if card.data_sha256 and preference_hash(prefs) != card.data_sha256:
        raise MoergeError(f"{card.data}: changed since the expert was tuned on it (its hash differs from the card's); "
                          "give its original data")
    return [Example(p.prompt, p.chosen) for p in prefs]
