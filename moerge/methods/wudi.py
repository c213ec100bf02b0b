"""WUDI, Whoever Started the Interference Should End It (Cheng et al., ICML 2025, arXiv 2503.08099): a
data-free merge that needs no scale.

A linear layer's task vector τₜ spans the inputs its task sends there (its rows are a basis of them),
so the merged change τ_m should act on task t's inputs as τₜ does. Per layer weight, from the sum
τ_m = Σₜ τₜ, WUDI minimises the interference

    L(τ_m) = Σₜ ‖(τ_m − τₜ) τₜᵀ‖² / ‖τₜ‖²

with Adam (the paper: lr 1e-5, 300 steps), then W = W₀ + τ_m. The loss is quadratic, so each step needs
only τ_m S − C, with S = Σₜ τₜᵀτₜ/‖τₜ‖² and C = Σₜ τₜ τₜᵀτₜ/‖τₜ‖² formed once: one (out × in) by
(in × in) product per step, whatever the number of tasks. Being quadratic, it also has its minimum in
closed form (``solve``): τ_m = C S⁺, the point plain gradient descent from the sum converges to, with no
step size to choose (the paper's lr suits ViT task vectors; on LLM LoRAs 300 steps of it barely move).

One task gives that task back (its loss is zero at the start); tasks whose inputs are orthogonal give
their sum; the order of the tasks does not matter. Vectors, biases and token tables are averaged
(``subspace``).
"""

from __future__ import annotations

import torch

from moerge.methods.registry import Method, Param, register
from moerge.methods.subspace import average, is_matrix


def interference(merged: torch.Tensor, deltas: list[torch.Tensor]) -> float:
    """L(τ_m): what WUDI minimises (for tests and reports)."""
    return float(sum(((merged - d) @ d.T).square().sum() / d.square().sum().clamp(min=1e-30) for d in deltas))


def wudi(base: torch.Tensor, tensors: list[torch.Tensor], *, lr: float = 1e-5, steps: int = 300, solve: bool = False,
         name: str | None = None) -> torch.Tensor:
    if not is_matrix(base, name):
        return average(base, tensors)
    w0 = base.float()
    deltas = [t.float() - w0 for t in tensors]
    norms = [d.square().sum().clamp(min=1e-30) for d in deltas]
    s = sum(d.T @ d / n for d, n in zip(deltas, norms))  # (in, in)
    c = sum(d @ (d.T @ d) / n for d, n in zip(deltas, norms))  # (out, in)
    if solve:
        # the loss's minimum in closed form, τ_m = C S⁺: where plain gradient descent from the sum converges
        # (the sum's rows lie in the tasks' input span, and so does every gradient), with no step size to tune
        return (w0 + c.double() @ torch.linalg.pinv(s.double(), hermitian=True, rtol=1e-6)).to(base.dtype)
    merged = torch.nn.Parameter(sum(deltas))
    opt = torch.optim.Adam([merged], lr=lr)
    # at the optimum the gradient is rounding noise, which Adam's normalised steps would turn into moves of
    # lr each: stop when it is that small (one task, or tasks whose inputs are orthogonal, start there)
    tol = 1e-5 * float(torch.linalg.vector_norm(c)) + 1e-30
    for _ in range(int(steps)):
        with torch.no_grad():
            grad = 2 * (merged @ s - c)  # ∇L, from the loss's quadratic form
        if float(torch.linalg.vector_norm(grad)) <= tol:
            break
        merged.grad = grad
        opt.step()
    return (w0 + merged.detach()).to(base.dtype)


register(Method(
    "wudi", wudi,
    params=(Param("lr", float, 1e-5, low=0.0, open_low=True, help="Adam's step size (the paper's 1e-5)"),
            Param("steps", int, 300, low=0, high=100_000, help="Adam steps from the task vectors' sum"),
            Param("solve", bool, False, help="the minimum in closed form, C S⁺ (where gradient descent from the sum "
                  "converges), instead of Adam steps: no step size to tune")),
    base="required", min_inputs=1, pretty="WUDI", reference="https://arxiv.org/abs/2503.08099",
    notes="per layer, data-free: from the sum, Adam on Σ‖(τ_m − τ_t)τ_tᵀ‖²/‖τ_t‖²; other tensors averaged",
    extra={"tensor_name": True},
))
