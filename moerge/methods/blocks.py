"""Aligned blocks of a base and its inputs, in the compute dtype.

Merging a bf16 checkpoint tensor-at-a-time means converting every input to float32 whole: a copy
twice the size of the input, and slow, because the conversion and each following elementwise op walk
memory far larger than the caches. Methods that are elementwise once a few whole-tensor statistics
are known (thresholds, masks, norms) instead see the tensors in blocks of a few hundred thousand
entries, converted into reused scratch buffers that stay in cache. The same code serves whole
tensors (one block), so a method has one implementation, tested once.
"""

from __future__ import annotations

from typing import Iterator

import torch

DEFAULT_BLOCK = 1 << 18


class PerElement(list):
    """A per-input list of flat tensors (or None) that ``prepare`` hands to the method, cut per block."""

    def block(self, sl: slice) -> "PerElement":
        return PerElement(None if t is None else t[sl] for t in self)


def cut(extras: dict, sl: slice, whole: bool) -> dict:
    if whole:
        return extras
    return {k: v.block(sl) if isinstance(v, PerElement) else v for k, v in extras.items()}


class Blocks:
    """Flat, aligned views of ``base`` (may be None) and ``tensors``, read block by block.

    Blocks yielded by iteration live in scratch buffers that the next block overwrites, and a method
    may overwrite them; ``prepare`` functions must only read them. ``cast`` rounds inputs to the
    recipe's dtype before they are widened to the compute dtype ``work``.
    """

    def __init__(self, base: torch.Tensor | None, tensors: list[torch.Tensor], work: torch.dtype,
                 cast: torch.dtype | None = None, size: int | None = None):
        self.shape = tensors[0].shape
        self.base = None if base is None else base.reshape(-1)
        self.tensors = [t.reshape(-1) for t in tensors]
        self.n = len(tensors)
        self.numel = self.tensors[0].numel()
        self.device = self.tensors[0].device  # where the merge computes: scratch and outputs are made there
        self.work = work
        self.cast = cast
        self.size = max(1, self.numel if size is None else min(size, self.numel))
        self.whole = self.size >= self.numel
        self._scratch: torch.Tensor | None = None

    def slices(self) -> Iterator[slice]:
        for s in range(0, self.numel, self.size):
            yield slice(s, min(self.numel, s + self.size))

    def _load(self, t: torch.Tensor, sl: slice, row: int) -> torch.Tensor:
        src = t[sl]
        if self.cast is not None and src.dtype != self.cast:
            src = src.to(self.cast)
        if self.whole and src.dtype == self.work:
            return src
        if self._scratch is None:
            self._scratch = torch.empty((self.n + 1, self.size), dtype=self.work, device=self.device)
        return self._scratch[row, : sl.stop - sl.start].copy_(src)

    def __iter__(self) -> Iterator[tuple[slice, torch.Tensor | None, list[torch.Tensor]]]:
        for sl in self.slices():
            base = None if self.base is None else self._load(self.base, sl, self.n)
            yield sl, base, [self._load(t, sl, i) for i, t in enumerate(self.tensors)]

    def magnitudes(self, i: int) -> torch.Tensor:
        """``|tensors[i] - base|`` (or ``|tensors[i]|`` without a base) as a new flat float32 tensor."""
        out = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        for sl in self.slices():
            x = self._load(self.tensors[i], sl, i)
            if self.base is not None:
                torch.sub(x, self._load(self.base, sl, self.n), out=out[sl])
                out[sl].abs_()
            else:
                torch.abs(x, out=out[sl])
        return out

    def dots(self, pairs: list[tuple[int, int]], delta: bool = False) -> dict[tuple[int, int], float]:
        """Inner products between inputs (index -1 is the base), in float64 accumulation; with
        ``delta`` the inputs' differences from the base are used."""
        acc = {p: 0.0 for p in pairs}
        for _, b, ts in self:
            vs = {i: (t - b if delta else t) for i, t in enumerate(ts)}
            vs[-1] = b
            for i, j in pairs:
                acc[(i, j)] += float(torch.dot(vs[i], vs[j]))
        return acc
