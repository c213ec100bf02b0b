"""Examples, splits and the JSONL format shared by built-in skills and users' own data.

A prompt is ``"<instruction>: <input>="`` and the completion is the answer; the model is trained to
emit the completion and then end-of-sequence. Splits are assigned by a hash of the input, so an input
(under any paraphrase) belongs to exactly one of train / validation / test, whatever the seed or the
number of examples asked for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from moerge.errors import MoergeError
from moerge.lm.example import Example  # noqa: F401  (re-exported: moerge.tasks.Example)
from moerge.tasks.skills import get
from moerge.util.files import atomic_file

SPLITS = ("train", "validation", "test")
SEPARATOR = "="


def format_prompt(instruction: str, x: str) -> str:
    return f"{instruction}: {x}{SEPARATOR}"


def split_of(x: str) -> str:
    h = int.from_bytes(hashlib.blake2b(x.encode(), digest_size=4).digest(), "little") % 10
    return "test" if h == 0 else "validation" if h == 1 else "train"


def is_user_task(task: str) -> bool:
    """A task given as a JSONL file of the user's own examples, rather than a built-in skill's name."""
    return task.endswith(".jsonl")


def user_rows(path: str) -> list[Example]:
    """A user task's rows, read once per version of the file (a task is asked for shots, test rows
    and usage prompts in turn)."""
    st = Path(path).stat() if Path(path).is_file() else None
    return _read_cached(path, st.st_mtime_ns if st else None, st.st_size if st else None)


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int | None, size: int | None) -> list[Example]:
    return read_jsonl(path)


def examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` examples of a built-in skill from one split; deterministic in (task, split, n, seed).
    A user task (a JSONL path) gives its first ``n`` rows whose prompt hashes to ``split`` (the split
    `expert train --data` holds out, so a model is never scored on rows it was trained on)."""
    if split not in SPLITS:
        raise MoergeError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if is_user_task(task):
        rows = [Example(r.prompt, r.completion, task) for r in user_rows(task) if split_of(r.prompt) == split][:n]
        if not rows:
            raise MoergeError(f"{task}: no row falls in the {split} split (a prompt's hash puts about 1 in 10 there); "
                              "add more rows")
        return rows
    skill = get(task)
    rng = random.Random(f"{task}/{split}/{seed}")
    out: list[Example] = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        x, y = skill.sample(rng)
        if split_of(x) == split:
            out.append(Example(skill.prompt(rng.choice(skill.instructions), x), y, task))
    raise MoergeError(f"task {task}: its inputs are too few for {n} {split} examples; ask for fewer")


def mixture(tasks: Iterable[str], split: str, n_per_task: int, seed: int = 0) -> list[Example]:
    """Several tasks' examples, shuffled together (multitask training, pretraining)."""
    out = [e for t in tasks for e in examples(t, split, n_per_task, seed)]
    random.Random(seed).shuffle(out)
    return out


def write_jsonl(path: str | os.PathLike, rows: Iterable[Example]) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for e in rows:
            f.write(json.dumps({k: v for k, v in asdict(e).items() if v != "" or k != "task"}) + "\n")
    return path


def json_rows(path: str | os.PathLike, fields: tuple[str, ...]) -> list[dict]:
    """The objects of a JSONL file, each checked to have string ``fields``; errors name the line."""
    path = Path(path)
    if not path.is_file():
        shape = ", ".join(f'"{k}": ...' for k in fields)
        what = "is a folder" if path.is_dir() else "no such file"
        raise MoergeError(f"{path}: {what}; give a JSONL file of {{{shape}}} lines")
    need = f'a string field "{fields[0]}"' if len(fields) == 1 else "string fields " + " and ".join(f'"{k}"' for k in fields)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoergeError(f"{path}: line {n}, column {e.colno}: not JSON ({e.msg}); one JSON object per line, "
                                  "with newlines inside strings written as \\n") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
                raise MoergeError(f"{path}: line {n}: needs {need}")
            out.append(row)
    if not out:
        raise MoergeError(f"{path}: has no examples")
    return out


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a task, from a JSONL file of ``{"prompt": ...}`` objects (``completion`` ignored) or a
    text file with one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise MoergeError(f"{path}: no such file; give a JSONL file of {{\"prompt\": ...}} lines or a text file of prompts")
    if path.suffix == ".jsonl":
        return [r["prompt"] for r in json_rows(path, ("prompt",))]
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise MoergeError(f"{path}: has no prompts")
    return lines


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Users' data: one ``{"prompt": ..., "completion": ...}`` object per line (``task`` optional)."""
    return [Example(r["prompt"], r["completion"], str(r.get("task", ""))) for r in json_rows(path, ("prompt", "completion"))]
