"""Each method against an independent, deliberately naive reference, plus algebraic properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moerge.methods import get
from moerge.methods.sparsify import outlier_mask, rank_range_mask, top_k_mask


def call(name, base, tensors, seed=0, **params):
    gen = torch.Generator().manual_seed(seed)
    return get(name)(None if base is None else base.clone(), [t.clone() for t in tensors], generator=gen, **params)


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ naive references

def ref_topk_mask(x, density):
    flat = x.abs().reshape(-1).tolist()
    k = max(1, int(density * len(flat)))
    order = sorted(range(len(flat)), key=lambda i: -flat[i])[:k]
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(x.shape)


def ref_ties(base, tensors, weights, density, normalize=True, lam=1.0):
    deltas = [(t - base) * ref_topk_mask(t - base, density) * w for t, w in zip(tensors, weights)]
    out = torch.zeros_like(base)
    flat_b = base.reshape(-1)
    for j in range(flat_b.numel()):
        vals = [d.reshape(-1)[j].item() for d in deltas]
        total = sum(vals)
        sign = 1.0 if total >= 0 else -1.0
        agree = [(v, w) for v, w in zip(vals, weights) if v != 0 and math.copysign(1, v) == sign]
        s = sum(v for v, _ in agree)
        if normalize:
            div = sum(w for _, w in agree)
            s = s / (div if div != 0 else 1)
        out.reshape(-1)[j] = s * lam
    return base + out


def ref_slerp(t, a, b):
    ua, ub = a.reshape(-1) / a.norm(), b.reshape(-1) / b.norm()
    dot = float((ua * ub).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    om = math.acos(dot)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


# ------------------------------------------------------------------ exact references

def test_linear_matches_weighted_mean():
    xs = [rnd(5, 7, seed=i) for i in range(3)]
    w = [0.2, 0.5, 1.3]
    out = call("linear", None, xs, weight=w, normalize=True)
    torch.testing.assert_close(out, sum(wi * x for wi, x in zip(w, xs)) / sum(w))
    out = call("linear", None, xs, weight=w, normalize=False)
    torch.testing.assert_close(out, sum(wi * x for wi, x in zip(w, xs)))


def test_task_arithmetic_reference():
    base, xs = rnd(6, 4, seed=9), [rnd(6, 4, seed=i) for i in range(3)]
    w = [0.5, -0.25, 1.0]
    out = call("task_arithmetic", base, xs, weight=w, density=[1.0] * 3, **{"lambda": 0.8})
    torch.testing.assert_close(out, base + 0.8 * sum(wi * (x - base) for wi, x in zip(w, xs)))


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_reference(normalize):
    base, xs = rnd(7, 5, seed=10), [rnd(7, 5, seed=i) for i in range(3)]
    w = [0.7, 0.4, 1.1]
    out = call("ties", base, xs, weight=w, density=[0.4] * 3, normalize=normalize, **{"lambda": 1.2})
    torch.testing.assert_close(out, ref_ties(base, xs, w, 0.4, normalize, 1.2))


def test_magnitude_keeps_exactly_the_largest():
    x = rnd(13, 11, seed=3)
    for d in (0.01, 0.1, 0.33, 0.5, 0.99):
        kept = top_k_mask(x.abs().reshape(-1).float(), d).reshape(x.shape)
        assert torch.equal(kept, ref_topk_mask(x, d))


def test_magnitude_outliers_reference():
    x = rnd(20, 10, seed=4)
    out = x * outlier_mask(x.abs().reshape(-1).float(), density=0.5, gamma=0.1).reshape(x.shape)
    order = x.abs().reshape(-1).argsort()  # ascending
    n, target, n_top = x.numel(), 100, 20
    n_bot = n - target - n_top
    want = torch.zeros(n, dtype=torch.bool)
    want[order[n_bot:n_bot + target]] = True
    assert torch.equal(out.reshape(-1) != 0, want)
    assert int((out != 0).sum()) == 100


def test_slerp_reference_and_ends():
    a, b = rnd(8, 3, seed=1), rnd(8, 3, seed=2)
    for t in (0.0, 0.25, 0.5, 1.0):
        out = call("slerp", a, [b], t=t)
        torch.testing.assert_close(out, ref_slerp(t, a, b))
    torch.testing.assert_close(call("slerp", a, [b], t=0.0), a)
    torch.testing.assert_close(call("slerp", a, [b], t=1.0), b)
    # colinear inputs fall back to linear interpolation
    torch.testing.assert_close(call("slerp", a, [2 * a], t=0.5), 1.5 * a)


def test_nuslerp_with_base_interpolates_task_vectors():
    base, a, b = rnd(4, 6, seed=1), rnd(4, 6, seed=2), rnd(4, 6, seed=3)
    out = call("nuslerp", base, [a, b], weight=[1.0, 3.0])
    torch.testing.assert_close(out, base + ref_slerp(0.75, a - base, b - base).reshape(4, 6), rtol=1e-6, atol=1e-8)


def test_model_stock_formula():
    base = rnd(50, seed=0)
    xs = [rnd(50, seed=i) * 0.1 + base for i in (1, 2, 3)]
    d = [x - base for x in xs]
    cos = [float(torch.nn.functional.cosine_similarity(d[i], d[j], dim=0)) for i in range(3) for j in range(i + 1, 3)]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    want = t * sum(xs) / 3 + (1 - t) * base
    torch.testing.assert_close(call("model_stock", base, xs), want)


def test_karcher_of_same_direction_is_that_direction_with_mean_norm():
    v = rnd(30, seed=5)
    out = call("karcher", None, [v, 3 * v])
    torch.testing.assert_close(out, 2 * v)


def test_multislerp_two_inputs_is_on_the_arc_and_symmetric():
    a, b = rnd(40, seed=1), rnd(40, seed=2)
    out = call("multislerp", None, [a, b], weight=[1.0, 1.0])
    swapped = call("multislerp", None, [b, a], weight=[1.0, 1.0])
    torch.testing.assert_close(out, swapped)
    ua, ub, uo = a / a.norm(), b / b.norm(), out / out.norm()
    # the midpoint direction is equally close to both ends
    assert abs(float(uo @ ua) - float(uo @ ub)) < 1e-9
    assert abs(float(out.norm()) - float((a.norm() + b.norm()) / 2)) < 1e-9


def test_dare_keeps_about_density_and_restores_l1():
    base = torch.zeros(200, 200, dtype=torch.float64)
    x = rnd(200, 200, seed=3)
    out = call("dare_linear", base, [x], seed=1, weight=[1.0], density=[0.3], rescale=True)
    kept = float((out != 0).double().mean())
    assert abs(kept - 0.3) < 0.01
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    again = call("dare_linear", base, [x], seed=1, weight=[1.0], density=[0.3], rescale=True)
    assert torch.equal(out, again)
    other = call("dare_linear", base, [x], seed=2, weight=[1.0], density=[0.3], rescale=True)
    assert not torch.equal(out, other)


def test_della_keep_probability_rises_with_magnitude():
    base = torch.zeros(64, 2000, dtype=torch.float64)
    x = rnd(64, 2000, seed=3)
    out = call("della_linear", base, [x], seed=0, weight=[1.0], density=[0.5], epsilon=[0.3], rescale=False)
    mag = x.abs()
    small = (out != 0)[mag < mag.quantile(0.1)].double().mean()
    large = (out != 0)[mag > mag.quantile(0.9)].double().mean()
    assert 0.18 < small < 0.32 and 0.68 < large < 0.82
    assert abs(float((out != 0).double().mean()) - 0.5) < 0.01
    nz = out != 0
    torch.testing.assert_close(out[nz], x[nz])  # survivors unscaled without rescale


def test_passthrough_and_scale():
    x = rnd(3, 3)
    torch.testing.assert_close(call("passthrough", None, [x]), x)
    torch.testing.assert_close(call("passthrough", None, [x], scale=[0.5]), 0.5 * x)


# ------------------------------------------------------------------ properties

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 1000), w=st.floats(0.1, 3))
def test_linear_of_one_model_is_identity(shape, seed, w):
    x = rnd(*shape, seed=seed)
    torch.testing.assert_close(call("linear", None, [x], weight=[w]), x)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 1000), n=st.integers(1, 4))
def test_ties_full_density_agreeing_signs_is_task_arithmetic(shape, seed, n):
    base = rnd(*shape, seed=seed)
    direction = rnd(*shape, seed=seed + 1)
    xs = [base + direction * (0.5 + i) for i in range(n)]  # every delta has the same signs
    w = [1.0 + i for i in range(n)]
    ties = call("ties", base, xs, weight=w, density=[1.0] * n, normalize=False)
    ta = call("task_arithmetic", base, xs, weight=w)
    torch.testing.assert_close(ties, ta)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 1000), t=st.sampled_from([0.0, 1.0]))
def test_slerp_ends(shape, seed, t):
    a, b = rnd(*shape, seed=seed), rnd(*shape, seed=seed + 7)
    torch.testing.assert_close(call("slerp", a, [b], t=t), b if t else a)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 1000), method=st.sampled_from(["dare_linear", "dare_ties"]))
def test_dare_with_density_one_is_task_arithmetic(shape, seed, method):
    base = rnd(*shape, seed=seed)
    xs = [rnd(*shape, seed=seed + i + 1) for i in range(2)]
    w = [0.6, 0.4]
    dare = call(method, base, xs, weight=w, density=[1.0, 1.0])
    if method == "dare_linear":
        torch.testing.assert_close(dare, call("task_arithmetic", base, xs, weight=w))
    else:
        torch.testing.assert_close(dare, call("ties", base, xs, weight=w, density=[1.0, 1.0], normalize=False))


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 1000), name=st.sampled_from(
    ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "model_stock"]))
def test_task_vector_methods_return_base_when_models_equal_base(shape, seed, name):
    base = rnd(*shape, seed=seed)
    params = {} if name == "model_stock" else {"weight": [1.0, 1.0]}
    out = call(name, base, [base.clone(), base.clone()], **params)
    torch.testing.assert_close(out, base)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), d=st.floats(0.05, 1.0))
def test_magnitude_kept_count(seed, d):
    x = rnd(9, 7, seed=seed)
    kept = int(top_k_mask(x.abs().reshape(-1).float(), d).sum())
    assert kept == max(1, int(d * x.numel()))


def test_inputs_may_be_float32():
    base, xs = rnd(4, 4).float(), [rnd(4, 4, seed=i).float() for i in (1, 2)]
    out = call("ties", base, xs, weight=[1.0, 1.0], density=[0.5, 0.5])
    assert out.dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 4), min_size=1, max_size=40), a=st.integers(0, 40), b=st.integers(0, 40))
def test_rank_range_mask_is_a_stable_sort_slice(values, a, b):
    """Equal magnitudes (common in bf16 deltas) are ranked by position, so exactly stop - start are kept."""
    mag = torch.tensor(values, dtype=torch.float32)
    start, stop = min(a, b), max(a, b)
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    want = torch.zeros(len(values), dtype=torch.bool)
    want[order[start:stop]] = True
    assert torch.equal(rank_range_mask(mag, start, stop), want)


def test_top_k_keeps_exactly_k_among_ties():
    mag = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 2.0])
    # ascending stable ranks: among the 2.0s the later ones rank higher
    assert top_k_mask(mag, 0.5).tolist() == [False, False, False, True, True, True]


BLOCKWISE = [
    ("linear", False, dict(weight=[0.5, 0.3, 0.2])),
    ("passthrough", False, dict(scale=[0.5])),
    ("task_arithmetic", True, dict(weight=[0.5, 0.3, 0.2], **{"lambda": 0.9})),
    ("ties", True, dict(weight=[0.5, 0.3, 0.2], density=[0.4, 0.5, 0.6])),
    ("dare_ties", True, dict(weight=[0.5, 0.3, 0.2], density=[0.4, 0.5, 0.6])),
    ("dare_linear", True, dict(weight=[0.5, 0.3, 0.2], density=[0.4, 0.5, 0.6])),
    ("breadcrumbs_ties", True, dict(weight=[0.5, 0.3, 0.2], density=[0.4, 0.5, 0.6], gamma=[0.05] * 3)),
    ("della", True, dict(weight=[0.5, 0.3, 0.2], density=[0.4, 0.5, 0.6], epsilon=[0.1] * 3)),
    ("slerp", True, dict(t=0.3)),
]


@pytest.mark.parametrize("name,with_base,params", BLOCKWISE, ids=[b[0] for b in BLOCKWISE])
@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocks_equal_whole_tensors(name, with_base, params, block):
    """The executor's path (bf16 storage, rounded to the recipe dtype, small blocks) gives the tensor
    that the whole-tensor call gives on the same rounded inputs."""
    method = get(name)
    n = 1 if name in ("slerp", "passthrough") else 3
    base = rnd(12, 9, seed=20).to(torch.bfloat16)
    xs = [(base.double() + 0.1 * rnd(12, 9, seed=i)).to(torch.bfloat16) for i in range(n)]
    cast = torch.float16
    kw = {k: v[:n] if isinstance(v, list) else v for k, v in params.items()}
    streamed = method.stream(base if with_base else None, xs, work=torch.float32, out_dtype=torch.float32, cast=cast,
                             block=block, generator=torch.Generator().manual_seed(5), **kw)
    whole = method(base.to(cast).float() if with_base else None, [x.to(cast).float() for x in xs],
                   generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(streamed, whole, rtol=1e-6, atol=1e-6)
