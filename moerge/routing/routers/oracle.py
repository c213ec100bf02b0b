"""Baselines: ``oracle`` knows each prompt's task (from its instruction, for the built-in skills) and
picks that task's expert; for a held-out composite it splits the weight evenly among the experts of
the composite's parts. ``uniform`` gives every expert the same weight."""

from __future__ import annotations

import torch

from moerge.routing.registry import ExampleRouter, register
from moerge.tasks.skills import SKILLS


def task_of(prompt: str) -> str | None:
    instruction = prompt.split(": ", 1)[0]
    for name, skill in SKILLS.items():
        if instruction in skill.instructions:
            return name
    return None


@register
class OracleRouter(ExampleRouter):
    name = "oracle"
    help = "knows the task of each built-in prompt and picks its expert (composites: their parts' experts)"

    def example_weights(self, routed, prompts, input_ids, attention_mask) -> torch.Tensor:
        tasks = [c.get("task") if c else None for c in routed.cards]
        w = torch.zeros(len(prompts), len(tasks))
        for i, p in enumerate(prompts):
            t = task_of(p)
            wanted = [t] if t in tasks else list(SKILLS[t].parts) if t in SKILLS else []
            idx = [tasks.index(x) for x in wanted if x in tasks]
            if idx:
                w[i, idx] = 1.0 / len(idx)
            else:
                w[i] = 1.0 / len(tasks)
        return w


@register
class UniformRouter(ExampleRouter):
    name = "uniform"
    help = "every expert at weight 1/E"

    def example_weights(self, routed, prompts, input_ids, attention_mask) -> torch.Tensor:
        n = len(routed.cards)
        return torch.full((input_ids.shape[0], n), 1.0 / n)
