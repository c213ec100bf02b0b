"""Low-rank algebra on experts, without materialising what need not be.

- ``factorize``: a dense delta (fine-tune minus base) as B·A of rank r by truncated SVD, with the share
  of the delta's energy (squared Frobenius norm) that the rank keeps: mergekit-extract-lora's job.
- ``concat``: several LoRA updates as one, exactly: stacking A's rows and B's columns gives
  Σ wᵢ sᵢ Bᵢ Aᵢ at rank Σ rᵢ, never forming a full matrix.
- ``refactor``: a LoRA update re-factorised to a smaller rank through QR of its factors and the SVD
  of an (r × r) core, so the cost is O((m + n) r²), not O(m n r); the energy kept is exact.
- ``core_space`` and ``knots_space``: the two shared bases in which LoRA experts are merged as LoRAs
  (``engine/lora_merge.py``), each lossless: every expert's update is exactly recovered from it.
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


NUMERICAL_RANK = 1e-7  # singular values below this share of the largest are rounding noise (float64 algebra)


def refactor(update: LowRank, rank: int | None) -> tuple[LowRank, float]:
    """The best rank-``rank`` approximation of a LoRA update, and the share of its energy kept.
    ``rank`` None: the update's numerical rank (exact, without the directions it does not have)."""
    a, b = update.a.double(), update.b.double() * update.scale
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    total = float(s.square().sum())
    have = int((s > s[:1].clamp(min=1e-300) * NUMERICAL_RANK).sum()) if s.numel() else 0
    k = max(1, min(have if rank is None else rank, have or 1, s.numel()))
    kept = float(s[:k].square().sum()) / total if total > 0 else 1.0
    new_a, new_b = _split(qb @ u[:, :k], s[:k], vh[:k] @ qa.T)
    return LowRank(new_a.float(), new_b.float(), 1.0, update.transpose), min(1.0, kept)


def _orthonormal_span(m: torch.Tensor, cols: bool) -> torch.Tensor:
    """Orthonormal basis of the column space (``cols``) or row space of ``m``, from its SVD (so the
    basis is the matrix's principal directions, whatever order its blocks came in), numerical rank only."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = max(1, int((s > s[:1].clamp(min=1e-300) * NUMERICAL_RANK).sum()))
    return u[:, :k] if cols else vh[:k].T


def core_space(updates: list[LowRank]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Core Space (Panariello et al., NeurIPS 2025, arXiv 2509.17786): reference bases U (out × R_b),
    the principal left directions of [s₁B₁ … s_T B_T], and V (in × R_a), the principal right directions
    of [A₁; …; A_T], and each update's core Mₜ = Uᵀ sₜBₜAₜ V (R_b × R_a). Lossless, sₜBₜAₜ = U Mₜ Vᵀ,
    since every Bₜ's columns lie in span U and every Aₜ's rows in span V; R ≤ Σ rₜ, so a merge runs on
    (Σr)² numbers per layer instead of out × in. Works in float64, in LoRA orientation (B·A)."""
    bs = [u.b.double() * u.scale for u in updates]
    as_ = [u.a.double() for u in updates]
    left = _orthonormal_span(torch.cat(bs, 1), cols=True)
    right = _orthonormal_span(torch.cat(as_, 0), cols=False)
    cores = [(left.T @ b) @ (a @ right) for b, a in zip(bs, as_)]
    return left, right, cores


def knots_space(updates: list[LowRank]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """KnOTS (Stoica et al., ICLR 2025, arXiv 2410.19735): the SVD of the updates side by side,
    [ΔW₁ … ΔW_T] = UΣ[V₁ᵀ … V_Tᵀ]. Returns (UΣ (out × R), [Vₜ (in × R)]), with ΔWₜ = UΣVₜᵀ exactly.
    Formed through the core space, from the SVD of [M₁ … M_T] (R × T·R), never from ΔWₜ."""
    left, right, cores = core_space(updates)
    p, s, gh = torch.linalg.svd(torch.cat(cores, 1), full_matrices=False)
    k = max(1, int((s > s[:1].clamp(min=1e-300) * NUMERICAL_RANK).sum()))
    p, s, gh = p[:, :k], s[:k], gh[:k]
    width = right.shape[1]
    vs = [right @ gh[:, t * width:(t + 1) * width].T for t in range(len(cores))]
    return (left @ p) * s, vs


def check_plain_lora(adapters: list, what: str = "combine") -> None:
    """Refuse what cannot be merged as LoRA factors: MoE experts, other kinds, modules_to_save, and
    adapters that disagree on fan_in_fan_out (one line each, naming the adapter)."""
    for e in adapters:
        if getattr(e, "model_updates", None) is not None:
            raise MoergeError(f"{e.path}: an expert of an MoE base (LoRA on its stacked experts or router): {what} "
                              "writes plain LoRA layers only; merge such experts with `moerge merge` instead")
        if e.kind != "lora" or any(type(u) is not LowRank for u in e.updates.values()):
            kind = {"ia3": "an (IA)³", "dora": "a DoRA", "full": "a full fine-tune"}.get(e.kind, "a LoRA with modules_to_save:")
            raise MoergeError(f"{e.path}: {kind} expert; only plain LoRA adapters "
                              f"{what} as LoRA factors; merge the others into a model with `moerge merge`")
    if len({bool(e.config.get("fan_in_fan_out")) for e in adapters}) > 1:
        raise MoergeError(f"the adapters disagree on fan_in_fan_out; they cannot be {what}d as one LoRA")


def peft_lora(config: dict, updates: dict[str, LowRank]) -> tuple[dict, dict]:
    """LoRA updates keyed by base tensor name as one PEFT LoRA: (adapter_config, tensors). ``config`` is
    an input adapter's (its task type, base name, fan_in_fan_out are kept); every scale is folded into
    the factors, so each module's alpha equals its rank, and ranks that differ go in ``rank_pattern``."""
    tensors, ranks = {}, {}
    for target, u in sorted(updates.items()):
        module = target[: -len(".weight")]
        emb = u.transpose and not config.get("fan_in_fan_out")
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        tensors[f"base_model.model.{module}.{a_key}"] = u.a.contiguous()
        tensors[f"base_model.model.{module}.{b_key}"] = (u.b * u.scale).contiguous()
        ranks[module] = u.rank
    top = max(ranks.values())
    config = dict(config) | {
        "r": top, "lora_alpha": top, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},  # every scale is 1: factors carry it
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
    }
    return config, tensors


def combine_adapters(adapters: list, weights: list[float] | None = None, rank: int | None = None) -> tuple[dict, dict, dict]:
    """Σ wᵢ · adapterᵢ as one PEFT LoRA: (adapter_config, tensors, kept energy per module).

    ``adapters`` are LoRA ``Expert``s of one base. Without ``rank`` the result is exact (concatenated
    factors); with it, each module is re-factorised to at most that rank."""
    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise MoergeError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    check_plain_lora(adapters)
    merged, kept = {}, {}
    for target in sorted({t for e in adapters for t in e.updates}):
        parts = [(e.updates[target], w) for e, w in zip(adapters, weights) if target in e.updates]
        u = concat([p for p, _ in parts], [w for _, w in parts])
        if rank is not None and u.rank > rank:
            u, kept[target] = refactor(u, rank)
        else:
            kept[target] = 1.0
        merged[target] = u
    config, tensors = peft_lora(adapters[0].config, merged)
    return config, tensors, kept
