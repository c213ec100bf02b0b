"""The MoE output architectures, one registry (as mergekit-moe's): Mixtral, DeepSeek MoE, Qwen MoE
(Qwen2-MoE) and Qwen3 MoE.

Each says which configs it can write (input model types, shared experts) and where each tensor goes:
the base's non-MLP tensors are copied under their own names; each expert's MLP goes under the
architecture's expert names; a shared expert (one at most, as in mergekit) under its shared name;
each layer gets a router (and Qwen MoE a shared-expert gate). Selection follows mergekit: an
``architecture:`` key narrows the candidates by name prefix; among those that fit, Mixtral is
preferred (older configs keep their output), otherwise the first in registry order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    name: str  # mergekit's name, matched by architecture: as a prefix
    inputs: tuple[str, ...]  # model types it takes (all inputs alike)
    fused: bool  # experts written fused per layer (gate_up_proj, down_proj), transformers 5's layout
    expert_name: Callable[[int, int, str], str]  # (layer, expert, proj) -> name (unfused layouts)
    router_name: Callable[[int], str]
    shared_name: Callable[[int, str], str] | None = None  # (layer, proj) -> name
    shared_gate_name: Callable[[int], str] | None = None  # Qwen MoE's per-layer shared-expert gate
    zero_qkv_bias: bool = False  # Qwen2-MoE always has q/k/v biases: zeros where the base has none

    def refuse(self, model_type: str | None, shared: list, gate_mode: str) -> str | None:
        """Why this architecture cannot write the config (None when it can)."""
        if model_type not in self.inputs:
            return f"needs {' or '.join(self.inputs)} inputs (these are {model_type or 'unknown'})"
        if self.shared_name is None:  # Mixtral, Qwen3 MoE
            return "has no shared experts" if shared else None
        if self.shared_gate_name is None:  # DeepSeek MoE: a shared expert every token goes through, ungated
            if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
                return "does not gate its shared expert (remove the shared expert's prompts)"
            return None
        if len(shared) != 1:  # Qwen MoE: exactly one shared expert, with a gate of its own
            return "needs exactly one shared expert"
        if gate_mode not in ("random", "library") and not shared[0].positive_prompts:
            return "gates its shared expert, so the shared expert needs positive_prompts"
        return None

    def gates_shared(self, shared: list) -> bool:
        return bool(shared) and self.shared_gate_name is not None

    def config(self, base_cfg, *, experts: int, per_token: int, intermediate: int, shared: int,
               dtype_name: str) -> dict:
        """config.json of the output, from the base's transformers config (as mergekit writes it)."""
        d = base_cfg.to_dict()
        for k in ("model_type", "architectures", "transformers_version"):
            d.pop(k, None)
        if self.name == "Mixtral":
            from transformers import MistralConfig, MixtralConfig

            mistral = MistralConfig(**d)
            mistral.sliding_window = None
            d = mistral.to_dict()
            for k in ("model_type", "architectures", "transformers_version"):
                d.pop(k, None)
            out = MixtralConfig(**d)
            out.architectures = ["MixtralForCausalLM"]
            out.num_local_experts = experts
            out.num_experts_per_tok = per_token
            out.intermediate_size = intermediate
            out.sliding_window = None
        elif self.name == "DeepSeek MoE":  # transformers has no "deepseek" class: mergekit's remote-code config
            d.update(architectures=["DeepseekForCausalLM"], model_type="deepseek", n_routed_experts=experts,
                     n_shared_experts=shared or None, num_experts_per_tok=per_token, first_k_dense_replace=0,
                     moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=True, moe_intermediate_size=intermediate,
                     torch_dtype=dtype_name,
                     auto_map={k: f"deepseek-ai/deepseek-moe-16b-base--{v}" for k, v in (
                         ("AutoConfig", "configuration_deepseek.DeepseekConfig"),
                         ("AutoModel", "modeling_deepseek.DeepseekModel"),
                         ("AutoModelForCausalLM", "modeling_deepseek.DeepseekForCausalLM"))})
            return d
        else:  # Qwen MoE (Qwen2-MoE) and Qwen3 MoE
            from transformers import Qwen2MoeConfig, Qwen3MoeConfig

            cls = Qwen2MoeConfig if self.name == "Qwen MoE" else Qwen3MoeConfig
            out = cls(**d)
            out.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
            out.num_experts = experts
            out.num_experts_per_tok = per_token
            out.decoder_sparse_step = 1
            out.norm_topk_prob = True
            out.intermediate_size = intermediate
            out.moe_intermediate_size = intermediate
            if cls is Qwen2MoeConfig:
                out.sliding_window = None
                out.use_sliding_window = False
                out.shared_expert_intermediate_size = intermediate
        out.dtype = dtype_name
        return json.loads(out.to_json_string(use_diff=True))


def _mlp(layer: int, e: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


def _gate(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


MIXTRAL_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

ARCHS: list[Arch] = [
    Arch("Mixtral", ("llama", "mistral"), False,
         lambda layer, e, proj: f"model.layers.{layer}.block_sparse_moe.experts.{e}.{MIXTRAL_W[proj]}.weight",
         lambda layer: f"model.layers.{layer}.block_sparse_moe.gate.weight"),
    Arch("DeepSeek MoE", ("llama", "mistral"), False, _mlp, _gate,
         shared_name=lambda layer, proj: f"model.layers.{layer}.mlp.shared_experts.{proj}.weight"),
    Arch("Qwen MoE", ("llama", "mistral", "qwen2"), False, _mlp, _gate,
         shared_name=lambda layer, proj: f"model.layers.{layer}.mlp.shared_expert.{proj}.weight",
         shared_gate_name=lambda layer: f"model.layers.{layer}.mlp.shared_expert_gate.weight", zero_qkv_bias=True),
    Arch("Qwen3 MoE", ("qwen3",), True, _mlp, _gate),
]


def select(architecture: str | None, model_type: str | None, shared: list, gate_mode: str) -> tuple[Arch | None, str]:
    """The output architecture for a config, or None and why none fits (one line)."""
    cands = [a for a in ARCHS if architecture is None or a.name.lower().startswith(architecture.lower())]
    if not cands:
        return None, (f"architecture {architecture!r} matches no output architecture; use one of "
                      + ", ".join(a.name for a in ARCHS) + " (or a prefix such as mixtral, deepseek, qwen, qwen3)")
    reasons = {a.name: a.refuse(model_type, shared, gate_mode) for a in cands}
    fits = [a for a in cands if reasons[a.name] is None]
    if not fits:
        return None, "no MoE output architecture fits: " + "; ".join(f"{n} {r}" for n, r in reasons.items())
    return next((a for a in fits if a.name == "Mixtral"), fits[0]), ""


def fused_experts(tensors: list[torch.Tensor], proj: str) -> torch.Tensor:
    """Qwen3-MoE's fused layout (transformers 5): gate_up_proj (experts, 2*inter, hidden) stacks each
    expert's [gate_proj; up_proj]; down_proj (experts, hidden, inter) stacks the down projections."""
    if proj == "gate_up_proj":
        return torch.stack([torch.cat([g, u], dim=0) for g, u in zip(tensors[0::2], tensors[1::2])])
    return torch.stack(tensors)
