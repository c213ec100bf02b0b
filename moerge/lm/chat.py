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


def bos_tokenizer(tokenizer):
    """A tokenizer that encodes text the way ``prompt_ids`` frames a prompt, for libraries that tokenize
    on their own (lm-eval, TRL): a copy that adds bos itself when the model reads bos + text (the
    built-in base's tokenizer does not, so their prompts would miss it); a chat model's tokenizer as
    it is (those libraries render its chat template)."""
    import copy

    if uses_chat(tokenizer) or tokenizer.bos_token_id is None:
        return tokenizer
    if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.add_bos_token = True
    tok.update_post_processor()
    return tok


def prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before the completion."""
    if uses_chat(tokenizer):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id] + p for p in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


_MARK = "\x00moerge-prompt\x00"


def prompt_texts(tokenizer, input_ids, attention_mask=None) -> list[str]:
    """The prompts back from their ids (what ``prompt_ids`` made, left-padded): for a chat model the user
    message inside its template, else the text after bos. Routers that read the words of a prompt (the
    oracle, LoraHub's task lookup) see exactly what the caller wrote."""
    rows = input_ids.tolist()
    masks = attention_mask.tolist() if attention_mask is not None else [[1] * len(r) for r in rows]
    kept = [[t for t, m in zip(r, mk) if m] for r, mk in zip(rows, masks)]
    if not uses_chat(tokenizer):
        return [tokenizer.decode(r, skip_special_tokens=True) for r in kept]
    frame = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True, tokenize=False)
    head, _, tail = frame.partition(_MARK)
    out = []
    for r in kept:
        text = tokenizer.decode(r, skip_special_tokens=False)
        if text.startswith(head) and text.endswith(tail):
            out.append(text[len(head):len(text) - len(tail)])
        else:  # ids that did not come from prompt_ids: their text without special tokens
            out.append(tokenizer.decode(r, skip_special_tokens=True))
    return out


def chat_ids(tokenizer, messages: Sequence[dict]) -> tuple[list[int], str]:
    """(token ids, the text routers read) of a conversation: the model's chat template with the
    generation header; a model without one (the built-in base) gets bos + its messages' text, one per
    line. Routers read the last user message, as ``prompt_texts`` gives them for single prompts."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = users[-1] if users else (messages[-1]["content"] if messages else "")
    if uses_chat(tokenizer):
        rendered = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"], text
    return prompt_ids(tokenizer, ["\n".join(m["content"] for m in messages)])[0], text


def completion_ids(tokenizer, prompt: str) -> list[int]:
    """A raw completion prompt (OpenAI's /v1/completions applies no template): the tokenizer's own
    encoding; a model without a chat template gets bos + text, as its experts were trained."""
    if uses_chat(tokenizer):
        return tokenizer(prompt)["input_ids"]
    return prompt_ids(tokenizer, [prompt])[0]
