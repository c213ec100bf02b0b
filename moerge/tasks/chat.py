"""How a prompt becomes token ids, the same way for training, evaluation and routing.

A tokenizer with a chat template (an instruct model such as SmolLM2-135M-Instruct) gets the prompt as
one user message rendered by its own template, generation header included, so experts learn and are
scored in the format the model was tuned on (its default system prompt too); the completion that
follows ends with the template's end-of-turn token, which is the tokenizer's eos for these models.
A tokenizer without one (the built-in character base) gets bos + the prompt text, as before.
"""

from __future__ import annotations

from typing import Sequence


def uses_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before the completion."""
    if uses_chat(tokenizer):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id] + p for p in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
