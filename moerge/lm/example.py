"""One example: a prompt and the completion expected of it, and the task it belongs to. What generation
scores, training fits and the task readers produce; it sits here, at the bottom, so all of them can."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    task: str = ""
