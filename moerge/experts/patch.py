"""A loaded model with LoRA updates added as side paths, swapped without reloading.

What scores many candidate LoRA merges on one loaded base (``search/lora.py``, the demo's LoRA merges).
Each update runs as PEFT runs an adapter: its own float32 product added to the layer's output,
y + s·(x Aᵀ) Bᵀ, rather than written into the weights, where a bf16 base would round a LoRA's small
change away (entries of 10⁻⁴ on weights of 10⁻², whose bf16 step is about 10⁻⁴). So a candidate scores
what ``moerge eval --adapter`` will score for the expert written. ``apply`` replaces the previous
candidate's paths; ``remove`` leaves the model as loaded.
"""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.experts.kinds import LowRank


class Patched:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self.hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def apply(self, updates: dict[str, LowRank]) -> None:
        """Run these updates (keyed by base tensor name, ``name.weight``) instead of the previous ones."""
        missing = [t for t in updates if t.removesuffix(".weight") not in self.modules]
        if missing:
            raise MoergeError(f"{missing[0]}: the update changes a tensor the loaded model does not have; "
                              "load the base the experts were made on")
        for name in [n for n in self.hooks if n not in updates]:
            self.hooks.pop(name).remove()
            self.factors.pop(name)
        for target, u in updates.items():
            if not isinstance(u, LowRank):
                raise MoergeError(f"{target}: only LoRA updates run as side paths")
            module = self.modules[target.removesuffix(".weight")]
            where = next(module.parameters()).device
            # LoRA orientation: delta = B·A, so an input row x maps to x Aᵀ Bᵀ (an embedding's A has the vocabulary as columns)
            self.factors[target] = (u.a.float().to(where), (u.b.float() * u.scale).to(where),
                                    isinstance(module, torch.nn.Embedding))
            if target not in self.hooks:
                self.hooks[target] = module.register_forward_hook(self._hook(target))

    def _hook(self, target: str):
        def add(module, args, output):
            a, b, embedding = self.factors[target]
            x = args[0]
            side = torch.nn.functional.embedding(x, a.T) if embedding else x.to(a.dtype) @ a.T
            return output + (side @ b.T).to(output.dtype)

        return add

    def remove(self) -> None:
        for h in self.hooks.values():
            h.remove()
        self.hooks.clear()
        self.factors.clear()
