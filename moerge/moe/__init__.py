"""Mixture-of-experts models from dense ones (mergekit-moe's job): a Mixtral checkpoint whose attention,
norms and embeddings come from a base model, each expert's MLP from one dense model, and each layer's
router from the experts' prompts (``gate_mode``). See ``config`` (the schema) and ``build`` (plan, run)."""

from moerge.moe.config import MoEConfig, is_moe, parse_moe

__all__ = ["MoEConfig", "is_moe", "parse_moe"]
