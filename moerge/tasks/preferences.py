"""Preference pairs (TRL's ``{"prompt", "chosen", "rejected"}`` JSONL): read, split and hashed as an
expert's own data is, for DPO tuning and for the rows a DPO expert stands for."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from moerge.errors import MoergeError
from moerge.tasks.data import json_rows, split_of

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


def read_preferences(path: str | os.PathLike) -> list[Preference]:
    """A JSONL file of ``{"prompt", "chosen", "rejected"}`` strings (TRL's standard preference format);
    a malformed line, or a pair whose answers are the same, is one error naming the line."""
    rows = json_rows(path, FIELDS)
    for n, r in enumerate(rows, 1):
        if r["chosen"] == r["rejected"]:
            raise MoergeError(f"{path}: example {n}: chosen and rejected are the same answer; a preference needs two")
    return [Preference(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def split_preferences(prefs: list[Preference]) -> tuple[list[Preference], list[Preference]]:
    """(train, held out) by the prompt's hash, as users' JSONL is split for experts (about 1 in 5 held out)."""
    return [p for p in prefs if split_of(p.prompt) == "train"], [p for p in prefs if split_of(p.prompt) != "train"]


def preference_hash(prefs: list[Preference]) -> str:
    h = hashlib.sha256()
    for p in prefs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode() + b"\n")
    return "sha256:" + h.hexdigest()
