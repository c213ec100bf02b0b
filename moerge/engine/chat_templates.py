"""Chat templates a recipe can name (``chat_template: llama3``) or pick from its inputs (``auto``).

mergekit accepts a Jinja text, the name of a built-in template, or ``auto`` (the template most of
the inputs' tokenizers carry). The built-ins here are moerge's own renderings of those standard
conversation formats; each renders ``messages`` (role + content) and ``add_generation_prompt`` as the
format's reference describes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from moerge.errors import MoergeError

TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set system = namespace(text='') %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
        "{% set system.text = '' %}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check(value: str) -> str:
    """What a recipe may give: a built-in name, ``auto``, or a Jinja text (it has ``{``)."""
    if value in TEMPLATES or value == "auto" or "{" in value:
        return value
    raise ValueError(f"unknown chat template {value!r}; give a Jinja template, auto, or one of {', '.join(sorted(TEMPLATES))}")


def folder_template(folder: Path) -> str | None:
    """The chat template a model folder's tokenizer carries (chat_template.jinja, or tokenizer_config.json's)."""
    if not folder.is_dir():
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip() or None
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            t = json.loads(cfg.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return t.strip() if isinstance(t, str) and t.strip() else None
    return None


def resolve(value: str, folders: list[Path]) -> str | None:
    """The template text for a recipe's ``chat_template``: ``auto`` is the template most inputs carry
    (None when none carries one: the output keeps its tokenizer's own)."""
    if value == "auto":
        found = [t for t in (folder_template(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if "{" not in value:
        raise MoergeError(f"chat_template: unknown template {value!r}")
    return value
