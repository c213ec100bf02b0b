"""Low-rank algebra on experts, without materialising what need not be.

- ``factorize``: a dense delta (fine-tune minus base) as B·A of rank r by truncated SVD, with the share
  of the delta's energy (squared Frobenius norm) that the rank keeps: mergekit-extract-lora's job.
- ``concat``: several LoRA updates as one, exactly: stacking A's rows and B's columns gives
  Σ wᵢ sᵢ Bᵢ Aᵢ at rank Σ rᵢ, never forming a full matrix.
- ``refactor``: a LoRA update re-factorised to a smaller rank through QR of its factors and the SVD
  of an (r × r) core, so the cost is O((m + n) r²), not O(m n r); the energy kept is exact.
"""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.experts.kinds import LowRank

EXACT_SVD_MAX = 4096  # beyond this, singular vectors come from a randomized SVD (energy stays exact)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors: B = U √S, A = √S Vᴴ."""
    root = s.sqrt()
    return vh * root.unsqueeze(1), u * root.unsqueeze(0)


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r × in), B (out × r), kept energy in [0, 1]) with B·A the best rank-r approximation."""
    d = delta.double()
    total = float(d.square().sum())
    rank = max(1, min(rank, *d.shape))
    if min(d.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(d, q=min(rank + 10, *d.shape), niter=4)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    kept = float(s.square().sum()) / total if total > 0 else 1.0
    a, b = _split(u, s, vh)
    return a.to(delta.dtype), b.to(delta.dtype), min(1.0, kept)


def concat(updates: list[LowRank], weights: list[float] | None = None) -> LowRank:
    """One LowRank equal to Σ wᵢ · updateᵢ (scales folded into B, so the result's scale is 1)."""
    weights = weights or [1.0] * len(updates)
    if len({u.transpose for u in updates}) > 1 or len({u.shape() for u in updates}) > 1:
        raise ValueError("LoRA updates of different shapes or layouts cannot be concatenated")
    a = torch.cat([u.a.float() for u in updates], dim=0)
    b = torch.cat([u.b.float() * (u.scale * w) for u, w in zip(updates, weights)], dim=1)
    return LowRank(a, b, 1.0, updates[0].transpose)


def refactor(update: LowRank, rank: int) -> tuple[LowRank, float]:
    """The best rank-``rank`` approximation of a LoRA update, and the share of its energy kept."""
    a, b = update.a.double(), update.b.double() * update.scale
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    total = float(s.square().sum())
    k = max(1, min(rank, s.numel()))
    kept = float(s[:k].square().sum()) / total if total > 0 else 1.0
    new_a, new_b = _split(qb @ u[:, :k], s[:k], vh[:k] @ qa.T)
    return LowRank(new_a.float(), new_b.float(), 1.0, update.transpose), min(1.0, kept)


def combine_adapters(adapters: list, weights: list[float] | None = None, rank: int | None = None) -> tuple[dict, dict, dict]:
    """Σ wᵢ · adapterᵢ as one PEFT LoRA: (adapter_config, tensors, kept energy per module).

    ``adapters`` are LoRA ``Expert``s of one base. Without ``rank`` the result is exact (concatenated
    factors); with it, each module is re-factorised to at most that rank."""
    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise MoergeError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    for e in adapters:
        if getattr(e, "model_updates", None) is not None:
            raise MoergeError(f"{e.path}: an expert of an MoE base (LoRA on its stacked experts or router): combine "
                              "writes plain LoRA layers only; merge such experts with `moerge merge` instead")
        if e.kind != "lora" or any(type(u) is not LowRank for u in e.updates.values()):
            raise MoergeError(f"{e.path}: a {e.kind} expert (or one with modules_to_save); only plain LoRA adapters combine "
                              "without materialising; merge the others with `moerge merge`")
    if len({bool(e.config.get("fan_in_fan_out")) for e in adapters}) > 1:
        raise MoergeError("the adapters disagree on fan_in_fan_out; they cannot be combined")
    tensors, ranks, kept = {}, {}, {}
    for target in sorted({t for e in adapters for t in e.updates}):
        parts = [(e.updates[target], w) for e, w in zip(adapters, weights) if target in e.updates]
        u = concat([p for p, _ in parts], [w for _, w in parts])
        if rank is not None and u.rank > rank:
            u, kept[target] = refactor(u, rank)
        else:
            kept[target] = 1.0
        module = target[: -len(".weight")]
        emb = u.transpose and not adapters[0].config.get("fan_in_fan_out")
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        tensors[f"base_model.model.{module}.{a_key}"] = u.a.contiguous()
        tensors[f"base_model.model.{module}.{b_key}"] = u.b.contiguous()
        ranks[module] = u.rank
    top = max(ranks.values())
    config = dict(adapters[0].config) | {
        "r": top, "lora_alpha": top, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},  # every scale is 1: factors carry it
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
    }
    return config, tensors, kept
