"""Scoring a routed model task by task: what ``moerge route eval`` and the demo report.

A few-shot router (LoraHub) first adapts to each task from ``shots`` of its training examples, the
setting of its paper (a new task comes with a handful of labelled examples); every other router sees
only the test prompts.
"""

from __future__ import annotations

from moerge.errors import MoergeError
from moerge.eval import evaluate
from moerge.eval.harness import is_lm_eval
from moerge.routing.model import RoutedModel
from moerge.tasks import examples


def evaluate_routed(routed: RoutedModel, tasks: list[str], *, n: int = 200, shots: int = 5,
                    usage_n: int = 50) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Exact match on ``n`` test examples of each task, and the mean weight each expert got on its
    first ``usage_n`` test prompts."""
    if any(is_lm_eval(t) for t in tasks):
        raise MoergeError("route eval --tasks: lm-eval tasks have no expert usage to show; score a routed model on them "
                          "with `moerge route eval --lm-eval TASKS`")
    scores, usage = {}, {}
    for t in tasks:
        if routed.router.few_shot:
            routed.router.adapt(routed, examples(t, "train", shots))
        scores[t] = evaluate(routed, routed.tokenizer, [t], n=n)[t]
        usage[t] = routed.usage([e.prompt for e in examples(t, "test", min(n, usage_n))]).tolist()
    return scores, usage
