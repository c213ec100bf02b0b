"""What depends on a model's architecture, read from the model (its config and its layer names) and
one small table, not from Llama's names.

(IA)³ scales the attention keys and values and the feed-forward activations (Liu et al. 2022), so it
needs to know which linear layers those are in each family. PEFT's own table answers for the families
it lists; ``IA3`` below adds the ones it does not (fused projections included: Phi-3's ``qkv_proj``
scales queries, keys and values together, as GPT-NeoX's ``query_key_value`` does in PEFT's table).
A family neither table knows is read from its layer names; one line when that finds nothing.
"""

from __future__ import annotations

from moerge.errors import MoergeError

# model_type -> (target modules, the feed-forward ones among them): families PEFT's table lacks
IA3: dict[str, tuple[list[str], list[str]]] = {
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "olmo2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "granite": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}
KEYS_VALUES = (("k_proj", "v_proj"), ("qkv_proj",), ("query_key_value",), ("Wqkv",), ("c_attn",))
FEED_FORWARD_OUT = ("down_proj", "dense_4h_to_h", "fc2", "w2", "c_proj")


def linear_names(model) -> set[str]:
    """The last name part of every linear layer (``k_proj``, ``dense_4h_to_h``, ...)."""
    from torch import nn

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def ia3_modules(model) -> tuple[list[str], list[str]]:
    """(target modules, feed-forward modules) of (IA)³ for ``model``: this file's table, else PEFT's,
    else the model's own layer names; each checked against the layers the model has."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    kind = getattr(model.config, "model_type", "?")
    have = linear_names(model)
    if kind in IA3:
        targets, ff = IA3[kind]
    elif kind in PEFT_TARGETS and kind in PEFT_FF:
        targets, ff = list(PEFT_TARGETS[kind]), list(PEFT_FF[kind])
    else:
        attn = next((list(group) for group in KEYS_VALUES if all(n in have for n in group)), [])
        ff = [n for n in FEED_FORWARD_OUT if n in have][:1]
        targets = attn + ff
    missing = [n for n in targets if n not in have]
    if not targets or not ff or missing:
        raise MoergeError(f"(IA)3 on {kind}: cannot tell which linear layers are its attention keys/values and its "
                          f"feed-forward output ({'missing ' + ', '.join(missing) if missing else 'none found'}; its "
                          f"linear layers: {', '.join(sorted(have))}); use --adapter lora or dora")
    return targets, ff
