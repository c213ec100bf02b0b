"""LoraHub (Huang et al. 2023): for a new task, find composition weights of the experts by
gradient-free search (nevergrad) on a handful of its examples, then use them as one merged adapter.

The composition is LoraHub's: the factors are combined, A = Σ w_e A_e and B = Σ w_e B_e (so the update
(Σ w_e B_e)(Σ w_e A_e) has cross terms, unlike task arithmetic's Σ w_e B_e A_e); it needs LoRA experts.
The objective is too: the mean token loss of the completions plus 0.05 · |w|₁, with w in
[-1.5, 1.5]^E, starting from zero. The search only needs forwards of the few examples."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.lm.batching import collate, completion_loss, encode
from moerge.lm.device import to_device
from moerge.routing.registry import ExampleRouter, register


@register
class LorahubRouter(ExampleRouter):
    name = "lorahub"
    help = "LoraHub: composition weights found by gradient-free search (nevergrad) on a few examples of the task"
    few_shot = True
    compose = "factors"

    def __init__(self, top_k: int | None = None, temperature: float = 1.0, examples: list | None = None,
                 budget: int = 40, seed: int = 0):
        super().__init__(top_k, temperature)
        self.examples, self.budget, self.seed = examples, budget, seed
        self.weights: torch.Tensor | None = None

    def fit(self, routed) -> None:
        for kind, card in zip(routed.kinds, routed.cards):
            if kind != "lora":
                raise MoergeError(f"expert {card.get('name', '?')} is {kind}: LoraHub composes LoRA factors (Σ w·A, Σ w·B); "
                                  "route it with smear or centroid, or merge it")
        if self.examples:
            self.adapt(routed, self.examples)

    def adapt(self, routed, examples: list) -> None:
        self.weights = search(routed, examples, self.budget, self.seed)

    def example_weights(self, routed, prompts, input_ids, attention_mask) -> torch.Tensor:
        if self.weights is None:
            raise MoergeError("the lorahub router needs a few examples of the task (route eval --shots N, or adapt(routed, examples))")
        return self.weights.expand(input_ids.shape[0], -1)


@torch.no_grad()
def search(routed, examples: list, budget: int = 40, seed: int = 0) -> torch.Tensor:
    try:
        import nevergrad as ng
    except ImportError:
        raise MoergeError("the lorahub router needs nevergrad: pip install 'moerge[lorahub]' (or pip install nevergrad)") from None

    batch = to_device(collate(encode(routed.tokenizer, examples), routed.tokenizer.pad_token_id), routed.state.device)
    n = len(routed.cards)

    def loss(w) -> float:
        routed.state.token_router = None
        routed.state.example_weights = torch.tensor(w, dtype=torch.float32, device=routed.state.device).expand(
            batch["input_ids"].shape[0], -1)
        try:
            value = float(completion_loss(routed.model, batch))
        finally:
            routed.unroute()
        return value + 0.05 * float(sum(abs(x) for x in w))

    param = ng.p.Array(init=[0.0] * n, lower=-1.5, upper=1.5)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    opt.parametrization.random_state.seed(seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the optimisers' advisory warnings about their own settings
        best = opt.minimize(loss)
    return torch.tensor(best.value, dtype=torch.float32).unsqueeze(0)
