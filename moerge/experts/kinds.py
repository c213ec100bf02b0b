"""What an expert changes in its base, per kind, as pure tensor functions.

An expert is a set of per-tensor *updates* keyed by base tensor name. Each update knows how to
produce its full-space delta from the base tensor, one tensor at a time, so nothing model-sized is
ever materialised:

- ``LowRank`` (LoRA): delta = s·B·A (transposed for embeddings and ``fan_in_fan_out`` layers);
- ``Dora``: LoRA plus a magnitude vector: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (row norms), as PEFT merges;
- ``Scaling`` ((IA)³): W' = W ⊙ l, with l a column (outputs) or a row (feed-forward inputs);
- ``Replace``: a full tensor (PEFT's ``modules_to_save``, or any tensor of a full fine-tune);
- ``StackedLowRank``: LoRA on an MoE base's fused expert weights (a 3-D ``(experts, out, in)`` tensor),
  one pair of factors per expert of the base, as PEFT's ``target_parameters`` trains them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    a: torch.Tensor  # (r, in)  [embeddings: (r, vocab)]
    b: torch.Tensor  # (out, r) [embeddings: (dim, r)]
    scale: float
    transpose: bool = False  # embeddings and fan_in_fan_out layers store W transposed

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def shape(self) -> tuple[int, ...]:
        s = (self.b.shape[0], self.a.shape[1])
        return s[::-1] if self.transpose else s

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        d = (self.b.float() @ self.a.float()) * self.scale
        return d.T if self.transpose else d


@dataclass
class Dora(LowRank):
    magnitude: torch.Tensor | None = None  # (out,)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError("a DoRA update needs the base weight")
        w = base.float().T if self.transpose else base.float()
        direction = w + (self.b.float() @ self.a.float()) * self.scale
        norm = torch.linalg.vector_norm(direction, dim=1)
        merged = direction * (self.magnitude.float() / norm).unsqueeze(1)
        d = merged - w
        return d.T if self.transpose else d


@dataclass
class Scaling:
    vector: torch.Tensor  # (out, 1) or, for feed-forward layers, (1, in)
    transpose: bool = False

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError("an (IA)3 update needs the base weight")
        v = self.vector.float()
        if base.dim() == 1:  # a bias: only output scalings touch it
            return base.float() * (v.reshape(-1) - 1)
        v = v.T if self.transpose else v
        return base.float() * (v - 1)


@dataclass
class Replace:
    tensor: torch.Tensor

    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError("a replacement needs the base tensor to express a delta")
        return self.tensor.float() - base.float()


@dataclass
class StackedLowRank:
    """LoRA on a stack of expert matrices: delta[k] = s·B_k·A_k for each expert k of an MoE layer.

    PEFT stores the stack's factors flat (A: (r·K, in), B: (out, r·K)); ``from_peft`` unfolds them so
    each expert's pair is a plain (r, in), (out, r) LoRA. ``transposed``: the base keeps the stack as
    (K, in, out) (a module with ``is_transposed``) instead of transformers' usual (K, out, in)."""

    a: torch.Tensor  # (K, r, in)
    b: torch.Tensor  # (K, out, r)
    scale: float
    transposed: bool = False

    @classmethod
    def from_peft(cls, a: torch.Tensor, b: torch.Tensor, experts: int, scale: float, transposed: bool = False) -> "StackedLowRank":
        """From PEFT's ParamWrapper layout: rows of A are expert-major (k·r + j), columns of B rank-major (j·K + k)."""
        a3 = a.reshape(experts, -1, a.shape[-1])
        b3 = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
        return cls(a3, b3, scale, transposed)

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def experts(self) -> int:
        return self.a.shape[0]

    def shape(self) -> tuple[int, ...]:
        k, out, i = self.b.shape[0], self.b.shape[1], self.a.shape[2]
        return (k, i, out) if self.transposed else (k, out, i)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        d = torch.bmm(self.b.float(), self.a.float()) * self.scale  # (K, out, in)
        return d.transpose(1, 2) if self.transposed else d


Update = LowRank | Dora | Scaling | Replace | StackedLowRank


def apply(base: torch.Tensor, update: Update) -> torch.Tensor:
    """The base tensor with the update applied, in the base's dtype."""
    if isinstance(update, Replace):
        return update.tensor.to(base.dtype)
    return (base.float() + update.delta(base)).to(base.dtype)
