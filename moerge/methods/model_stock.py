"""Model Stock (Jang et al. 2024): interpolate between the base and the fine-tunes' average by a
ratio set from how aligned their deltas are: t = N cos / (1 + (N - 1) cos)."""

from __future__ import annotations

import torch

from moerge.methods.registry import Method, Param, register


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        ws = [t if t.dim() > 1 else t.unsqueeze(0) for t in tensors]
    else:
        w0, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6  # opposing updates: keep the base rather than amplify them
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(shape)


register(Method(
    "model_stock", model_stock, params=(Param("filter_wise", bool, False, help="one ratio per row instead of per tensor"),),
    base="required", min_inputs=2, pretty="Model Stock", reference="https://arxiv.org/abs/2403.19522",
))
