"""A skill: an input generator, an exact answer, and paraphrased instructions (the type both suites use:
``skills.py``, the tiny model's, and ``real.py``, the real model's)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Skill:
    name: str
    instructions: tuple[str, ...]
    solve: Callable[[str], str]
    make_input: Callable[[random.Random], str]
    parts: tuple[str, ...] = field(default=())  # a composite: the skills applied, in order
    identity: bool = False  # copy: the one skill whose answer is its input
    template: str = ""  # the prompt's form, e.g. "{instruction}: {x}"; empty: the tiny suite's "instruction: x="

    def prompt(self, instruction: str, x: str) -> str:
        if self.template:
            return self.template.format(instruction=instruction, x=x)
        return f"{instruction}: {x}="

    @property
    def composite(self) -> bool:
        return bool(self.parts)

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """(input, answer), never with answer == input."""
        for _ in range(1000):
            x = self.make_input(rng)
            y = self.solve(x)
            if y != x or self.identity:
                return x, y
        raise RuntimeError(f"skill {self.name}: cannot draw an input that the skill changes")
