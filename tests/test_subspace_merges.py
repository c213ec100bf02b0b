"""The 2025 subspace merges (issue 33): TSV-M, Iso-C, Iso-CTS, and the data-free WUDI. Their invariants, checked on random
matrices, and one merge of each through the engine (embeddings and vectors averaged)."""

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.methods.iso import iso_c, iso_cts
from moerge.methods.subspace import polar
from moerge.methods.tsv import tsv
from moerge.methods.wudi import interference, wudi

g = torch.Generator().manual_seed(0)
W0 = torch.randn(24, 16, generator=g)


def low_rank(rows: slice, cols: slice, r: int) -> torch.Tensor:
    """A change of rank r living in the given rows and columns only."""
    d = torch.zeros(24, 16)
    n, m = rows.stop - rows.start, cols.stop - cols.start
    d[rows, cols] = torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)
    return d


def test_polar_factor_is_orthonormal_and_keeps_orthonormal_stacks():
    m = torch.randn(10, 4, generator=g)
    q = polar(m)
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(polar(q), q, atol=1e-5, rtol=0)


def test_tsv_one_task_in_is_that_task_out_and_orthogonal_tasks_add_up():
    d1 = low_rank(slice(0, 12), slice(0, 8), 3)
    torch.testing.assert_close(tsv(W0, [W0 + d1], name="layers.0.q.weight"), W0 + d1, atol=1e-4, rtol=1e-4)
    d2 = low_rank(slice(12, 24), slice(8, 16), 3)  # another subspace: rows and columns disjoint
    torch.testing.assert_close(tsv(W0, [W0 + d1, W0 + d2], name="x.weight"), W0 + d1 + d2, atol=1e-4, rtol=1e-4)
    # alpha scales the merged change
    torch.testing.assert_close(tsv(W0, [W0 + d1], alpha=0.5, name="x.weight"), W0 + 0.5 * d1, atol=1e-4, rtol=1e-4)


def test_subspace_merges_do_not_depend_on_the_order_of_the_tasks():
    ts = [W0 + torch.randn(24, 16, generator=g) * 0.1 for _ in range(3)]
    for merge in (tsv, iso_c, iso_cts, wudi):
        a, b = merge(W0, ts, name="x.weight"), merge(W0, ts[::-1], name="x.weight")
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=merge.__name__)


def test_iso_c_keeps_the_directions_of_the_sum_at_their_mean_singular_value():
    ts = [W0 + torch.randn(24, 16, generator=g) * 0.1 for _ in range(2)]
    total = sum(t - W0 for t in ts)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    got = iso_c(W0, ts, name="x.weight") - W0
    torch.testing.assert_close(got, s.mean() * u @ vh, atol=1e-5, rtol=1e-4)
    assert torch.allclose(torch.linalg.svdvals(got), s.mean().expand(16), atol=1e-4)  # a flat spectrum
    flat = 0.3 * polar(torch.randn(24, 16, generator=g))  # a change already isotropic comes back as it is
    torch.testing.assert_close(iso_c(W0, [W0 + flat], name="x.weight"), W0 + flat, atol=1e-5, rtol=1e-4)


def test_iso_cts_with_the_whole_rank_common_is_iso_c_and_adds_each_task_s_own_directions():
    ts = [W0 + torch.randn(24, 16, generator=g) * 0.1 for _ in range(3)]
    torch.testing.assert_close(iso_cts(W0, ts, common=1.0, name="x.weight"), iso_c(W0, ts, name="x.weight"),
                               atol=1e-5, rtol=1e-4)
    got = iso_cts(W0, ts, common=0.5, name="x.weight") - W0
    assert torch.linalg.matrix_rank(got) == 8 + 3 * 2  # k common directions + (r - k) // T of each task's own
    assert not torch.allclose(got, iso_c(W0, ts, name="x.weight") - W0, atol=1e-3)


def test_wudi_keeps_one_task_sums_orthogonal_ones_and_lowers_the_interference():
    d1 = low_rank(slice(0, 24), slice(0, 8), 3)
    torch.testing.assert_close(wudi(W0, [W0 + d1], name="x.weight"), W0 + d1, atol=1e-6, rtol=0)  # zero loss: unmoved
    d2 = low_rank(slice(0, 24), slice(8, 16), 3)  # inputs orthogonal to d1's
    torch.testing.assert_close(wudi(W0, [W0 + d1, W0 + d2], name="x.weight"), W0 + d1 + d2, atol=1e-6, rtol=0)
    ds = [torch.randn(24, 16, generator=g) * 0.1 for _ in range(3)]  # overlapping: the interference goes down
    got = wudi(W0, [W0 + d for d in ds], lr=1e-3, steps=200, name="x.weight") - W0
    assert interference(got, ds) < 0.5 * interference(sum(ds), ds)


@pytest.mark.parametrize("merge", [tsv, iso_c, iso_cts, wudi])
def test_vectors_and_token_tables_are_averaged(merge):
    b, ts = torch.randn(16, generator=g), [torch.randn(16, generator=g) for _ in range(2)]
    torch.testing.assert_close(merge(b, ts, name="norm.weight"), (ts[0] + ts[1]) / 2, atol=1e-6, rtol=0)
    m = [W0 + torch.randn(24, 16, generator=g) for _ in range(2)]
    torch.testing.assert_close(merge(W0, m, name="model.embed_tokens.weight"), (m[0] + m[1]) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_each_merges_a_model_through_the_engine(method, tmp_path):
    from moerge.lm.tiny import make_base, make_finetune

    base = make_base(tmp_path / "base", hidden=32, layers=1, intermediate=64)
    fts = [make_finetune(base, tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    recipe = {"merge_method": method, "base_model": str(base), "models": [{"model": str(f)} for f in fts],
              "parameters": {"lr": 1e-3, "steps": 20} if method == "wudi" else {"alpha": 1.0}}
    out = load_file(moerge.merge(recipe, tmp_path / "out").out_dir / "model.safetensors")
    w0, a, b = (load_file(p / "model.safetensors") for p in (base, *fts))
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(out[emb], (a[emb] + b[emb]) / 2, atol=1e-6, rtol=0)  # a token table: averaged
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(out[q], w0[q]) and not torch.allclose(out[q], (a[q] + b[q]) / 2, atol=1e-6)


def test_wudi_solved_in_closed_form_is_where_its_loss_is_least():
    ts = [W0 + low_rank(slice(0, 24), slice(0, 16), 2) * 0.1 for _ in range(3)]  # overlapping tasks
    deltas = [t - W0 for t in ts]
    solved = wudi(W0, ts, solve=True, name="x.weight") - W0
    loss = interference(solved, deltas)
    assert loss < 1e-3 * interference(sum(deltas), deltas)  # near zero where the sum interferes
    for _ in range(5):  # no nearby point does better
        assert interference(solved + 1e-3 * torch.randn(24, 16, generator=g), deltas) >= loss - 1e-6
    one = low_rank(slice(0, 12), slice(0, 8), 3)
    torch.testing.assert_close(wudi(W0, [W0 + one], solve=True, name="x.weight"), W0 + one, atol=1e-4, rtol=1e-4)
