"""sce, nearswap, ram, ramplus_tl and arcee_fusion against naive references written here with plain
Python loops over entries (deliberately nothing like the implementations), plus their edge cases and
what the recipe layer refuses. bench/parity.py checks them against mergekit itself."""

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.errors import MoergeError, MoergeWarning
from moerge.methods import get
from moerge.methods.registry import MERGEKIT_ONLY_PARAMS, all_param_names

NEW = ["sce", "nearswap", "ram", "ramplus_tl", "arcee_fusion"]


def call(name, base, tensors, **params):
    return get(name)(base.clone(), [t.clone() for t in tensors], generator=torch.Generator().manual_seed(0), **params)


def rnd(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sparse_delta(shape, p, seed):
    """A task vector that changes about a fraction ``p`` of the entries (as RL fine-tunes do)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * (torch.rand(*shape, generator=g, dtype=torch.float64) < p)


def flat(t):
    return t.reshape(-1).tolist()


def as_tensor(values, like):
    return torch.tensor(values, dtype=like.dtype).reshape(like.shape)


# ------------------------------------------------------------------ naive references

def ref_sce(base, xs, select_topk=1.0):
    b = flat(base)
    n, size = len(xs), len(b)
    d = [[x - y for x, y in zip(flat(t), b)] for t in xs]
    if select_topk < 1:
        var = []
        for j in range(size):
            col = [d[i][j] for i in range(n)]
            mean = sum(col) / n
            var.append(sum((c - mean) ** 2 for c in col) / n)
        k = int(sum(v != 0 for v in var) * select_topk)
        chosen = set(sorted(range(size), key=lambda j: -var[j])[:k])
        d = [[v if j in chosen else 0.0 for j, v in enumerate(row)] for row in d]
    w = [sum(v * v for v in row) / size for row in d]
    total = sum(w)
    w = [1 / n] * n if abs(total) < 1e-6 else [x / total for x in w]
    out = []
    for j in range(size):
        elected = 1 if sum(d[i][j] for i in range(n)) >= 0 else -1
        num = den = 0.0
        for i in range(n):
            v = d[i][j]
            if v != 0 and (v > 0) == (elected > 0):
                num += w[i] * v
                den += w[i]
        out.append(b[j] + num / max(den, 1e-6))
    return as_tensor(out, base)


def ref_nearswap(base, other, t):
    out = []
    for a, b in zip(flat(base), flat(other)):
        w = min(max(t / max(abs(a - b), 1e-6), 0.0), 1.0)
        out.append(w * b + (1 - w) * a)
    return as_tensor(out, base)


def ref_ram(base, xs, epsilon=1e-5, r=None, alpha=None):
    """RAM; with ``r`` and ``alpha`` RAM+ (tensor-local)."""
    b = flat(base)
    n = len(xs)
    d = [[x - y for x, y in zip(flat(t), b)] for t in xs]
    changed = [[abs(v) > epsilon for v in row] for row in d]
    count = [sum(changed[i][j] for i in range(n)) for j in range(len(b))]
    lam = [1.0] * n
    if r is not None:
        for i in range(n):
            unique = sum(1 for j, c in enumerate(changed[i]) if c and count[j] == 1)
            shared = sum(1 for j, c in enumerate(changed[i]) if c and count[j] > 1)
            lam[i] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    out = []
    for j in range(len(b)):
        movers = [i for i in range(n) if changed[i][j]]
        if len(movers) == 1:
            out.append(b[j] + lam[movers[0]] * d[movers[0]][j])
        elif movers:
            out.append(b[j] + sum(d[i][j] for i in movers) / len(movers))
        else:
            out.append(b[j])
    return as_tensor(out, base), lam


def ref_arcee_fusion(base, other):
    cols = base.shape[-1] if base.dim() else 1
    b, o = flat(base), flat(other)
    scores = []
    for start in range(0, len(b), cols):
        rb, ro = b[start:start + cols], o[start:start + cols]
        zb, zo = sum(math.exp(v) for v in rb), sum(math.exp(v) for v in ro)
        p = [math.exp(v) / zo + 1e-8 for v in ro]
        q = [math.exp(v) / zb + 1e-8 for v in rb]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        scores += [abs(x - y) * kl for x, y in zip(ro, rb)]
    s = sorted(scores)
    q1, med, q3 = (s[int(q * (len(s) - 1))] for q in (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)
    return as_tensor([y if sc >= threshold else x for x, y, sc in zip(b, o, scores)], base)


# ------------------------------------------------------------------ against the references

@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.25, 0.0])
def test_sce_reference(select_topk):
    base = rnd(9, 7, seed=1)
    xs = [base + rnd(9, 7, seed=10 + i, scale=0.5 + i) for i in range(3)]
    out = call("sce", base, xs, select_topk=select_topk)
    torch.testing.assert_close(out, ref_sce(base, xs, select_topk))
    if select_topk == 0:
        torch.testing.assert_close(out, base)


def test_sce_weights_follow_the_size_of_each_task_vector():
    """Calculate: the model that moved a matrix more leads it; tiny task vectors fall back to equal
    weights (their mean squares sum below 1e-6), which the reference reproduces."""
    base = rnd(6, 5, seed=2)
    direction = rnd(6, 5, seed=3).abs()  # every delta positive: no entry is erased
    xs = [base + direction, base + 3 * direction]
    w = [1 / 10, 9 / 10]  # mean squares 1 : 9
    torch.testing.assert_close(call("sce", base, xs), base + (w[0] * 1 + w[1] * 3) * direction)
    small = [base + 1e-4 * rnd(6, 5, seed=4 + i) for i in range(3)]
    torch.testing.assert_close(call("sce", base, small), ref_sce(base, small))
    # a model whose weight is negligible (~1e-8) and agrees alone at an entry is damped there: the
    # agreeing weights are floored at 1e-6, as in mergekit
    big, tiny = rnd(6, 5, seed=5), 1e-4 * rnd(6, 5, seed=6)
    big[0] = 0
    out = call("sce", base, [base + big, base + tiny])
    torch.testing.assert_close(out, ref_sce(base, [base + big, base + tiny]))
    assert 0 < float((out[0] - base[0]).abs().max()) < 0.1 * float(tiny[0].abs().max())


@pytest.mark.parametrize("t", [0.0, 1e-7, 0.05, 0.3, 1.0, 100.0])
def test_nearswap_reference(t):
    base = rnd(8, 6, seed=5)
    other = base + rnd(8, 6, seed=6, scale=0.5)
    other[0, :3] = base[0, :3]  # equal entries
    other[1, :3] = base[1, :3] + 5e-7  # differences below 1e-6 count as 1e-6
    out = call("nearswap", base, [other], t=t)
    want = ref_nearswap(base, other, t)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out - base, want - base, rtol=1e-6, atol=1e-14)  # the moves themselves, however small
    if t == 0:
        torch.testing.assert_close(out, base)
    if t == 100:
        torch.testing.assert_close(out, other)
    moved = (out - base).abs()
    assert float(moved.max()) <= t + 1e-12  # no entry moves farther than t


@pytest.mark.parametrize("epsilon", [1e-5, 0.3])
def test_ram_reference(epsilon):
    base = rnd(10, 8, seed=7)
    xs = [base + sparse_delta((10, 8), p, seed=20 + i) for i, p in enumerate((0.7, 0.4, 0.2))]
    out = call("ram", base, xs, epsilon=epsilon)
    torch.testing.assert_close(out, ref_ram(base, xs, epsilon)[0])


@pytest.mark.parametrize("r,alpha,epsilon", [(0.1, 0.2, 1e-5), (0.5, 1.0, 1e-5), (1.0, 0.4, 0.5), (0.0, 0.2, 1e-5)])
def test_ramplus_tl_reference(r, alpha, epsilon):
    base = rnd(12, 10, seed=8)
    xs = [base + sparse_delta((12, 10), p, seed=30 + i) for i, p in enumerate((0.8, 0.3, 0.1))]
    out = call("ramplus_tl", base, xs, r=r, alpha=alpha, epsilon=epsilon)
    want, lam = ref_ram(base, xs, epsilon, r, alpha)
    torch.testing.assert_close(out, want)
    if (r, alpha) == (0.5, 1.0):  # these inputs exercise both a clipped and an unclipped ratio
        assert any(math.isclose(x, 1 + r * alpha) for x in lam) and any(1 < x < 1 + r * alpha for x in lam)
    if r == 0:
        torch.testing.assert_close(out, call("ram", base, xs, epsilon=epsilon))


@pytest.mark.parametrize("shape", [(12, 9), (40,), (3, 4, 5)])
def test_arcee_fusion_reference(shape):
    base = rnd(*shape, seed=9)
    other = base + rnd(*shape, seed=11, scale=0.3)
    out = call("arcee_fusion", base, [other])
    want = ref_arcee_fusion(base, other)
    torch.testing.assert_close(out, want)
    kept = (out != base).double().mean()
    assert 0 < kept < 0.5  # the outliers of the importance scores, not the bulk


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 101, 1000, 4097])
def test_tukey_threshold_uses_the_sorted_index_convention(n):
    """Each quantile is the sorted value at floor(q * (n - 1)), mergekit's convention (not torch's
    interpolating quantile)."""
    from moerge.methods.arcee_fusion import tukey_threshold

    scores = rnd(n, seed=n).abs().float()
    s = sorted(scores.tolist())
    q1, med, q3 = (s[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    assert float(tukey_threshold(scores)) == pytest.approx(med + 1.5 * (q3 - q1), rel=1e-6)


def test_arcee_fusion_float32_matches_reference():
    base = rnd(16, 8, seed=12).float()
    other = base + rnd(16, 8, seed=13, scale=0.3).float()
    out = call("arcee_fusion", base, [other])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_arcee_fusion(base.double(), other.double()))


# ------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("name,params", [
    ("sce", {}), ("sce", {"select_topk": 0.5}), ("nearswap", {"t": 0.1}), ("ram", {}), ("ramplus_tl", {}),
    ("ramplus_tl", {"epsilon": 1e-12}), ("arcee_fusion", {}),
])
def test_zero_task_vectors_give_the_base(name, params):
    """Every input equal to the base: no 0/0 anywhere (sce's weights, RAM+'s ratio, fusion's threshold)."""
    base = rnd(7, 5, seed=14)
    n = 1 if name in ("nearswap", "arcee_fusion") else 3
    out = call(name, base, [base.clone() for _ in range(n)], **params)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base)


def test_one_input():
    base = rnd(9, 4, seed=15)
    x = base + rnd(9, 4, seed=16)
    torch.testing.assert_close(call("sce", base, [x]), x)  # its own weight is 1, every sign agrees
    # one model has zero variance everywhere: no position is selected and the base comes back
    torch.testing.assert_close(call("sce", base, [x], select_topk=0.5), base)
    eps = 0.5
    kept = ((x - base).abs() > eps)
    torch.testing.assert_close(call("ram", base, [x], epsilon=eps), torch.where(kept, x, base))
    # one model's changes are all unique: the shared/unique ratio is 0 and RAM+ is RAM
    torch.testing.assert_close(call("ramplus_tl", base, [x], epsilon=eps, r=1.0, alpha=1.0), torch.where(kept, x, base))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_ignores_changes_of_exactly_epsilon(name):
    base = torch.zeros(4, dtype=torch.float64)
    x = torch.tensor([0.5, -0.5, 0.75, 0.25], dtype=torch.float64)
    torch.testing.assert_close(call(name, base, [x], epsilon=0.5), torch.tensor([0, 0, 0.75, 0], dtype=torch.float64))


def test_ramplus_tl_counts_with_the_same_threshold():
    """Entry 0 moves by exactly epsilon in model 0: not a change, so it is not shared, and model 0's
    change at entry 1 stays unique with factor 1."""
    base = torch.zeros(4, dtype=torch.float64)
    xs = [torch.tensor([0.5, 0.75, 0, 0], dtype=torch.float64), torch.tensor([0.75, 0, 0.75, 0], dtype=torch.float64)]
    out = call("ramplus_tl", base, xs, epsilon=0.5, r=1.0, alpha=1.0)
    torch.testing.assert_close(out, torch.tensor([0.75, 0.75, 0.75, 0], dtype=torch.float64))


def test_ram_disjoint_changes_add_and_identical_changes_do_not():
    base = rnd(6, 6, seed=17)
    d = rnd(6, 6, seed=18)
    left = torch.zeros_like(d)
    left[:, :3] = d[:, :3]
    right = d - left
    torch.testing.assert_close(call("ram", base, [base + left, base + right]), base + d)
    torch.testing.assert_close(call("ram", base, [base + d, base + d, base + d]), base + d)


def test_ramplus_tl_boosts_unique_changes_by_the_shared_share():
    """Model 0 changes columns 0-3, model 1 columns 3-5: column 3 is shared (averaged), the rest
    unique. rho = shared / unique = 6/18 for model 0 and 6/12 for model 1."""
    base = rnd(6, 6, seed=17)
    d0, d1 = rnd(6, 6, seed=18), rnd(6, 6, seed=19)
    d0[:, 4:] = 0
    d1[:, :3] = 0
    out = call("ramplus_tl", base, [base + d0, base + d1], r=0.5, alpha=0.45)
    lam0, lam1 = 1 + 0.5 * (1 / 3), 1 + 0.5 * 0.45  # model 1's ratio 0.5 is clipped to alpha
    torch.testing.assert_close(out[:, :3], base[:, :3] + lam0 * d0[:, :3])
    torch.testing.assert_close(out[:, 3], base[:, 3] + (d0[:, 3] + d1[:, 3]) / 2)
    torch.testing.assert_close(out[:, 4:], base[:, 4:] + lam1 * d1[:, 4:])


def test_sce_erases_disagreeing_signs():
    base = torch.zeros(4, dtype=torch.float64)
    d0 = torch.tensor([1.0, 1.0, -1.0, 2.0], dtype=torch.float64)  # mean square 7/4
    d1 = torch.tensor([3.0, -3.0, 1.0, 0.0], dtype=torch.float64)  # mean square 19/4
    out = call("sce", base, [d0, d1])
    # 0: both agree, weighted 7:19; 1: the sum is negative, only -3 survives; 2: a zero sum elects +,
    # only +1 survives; 3: a zero delta never counts, so 2 comes through whole
    torch.testing.assert_close(out, torch.tensor([(7 * 1 + 19 * 3) / 26, -3.0, 1.0, 2.0], dtype=torch.float64))


BLOCKWISE = [
    ("sce", dict(select_topk=0.4), 3),
    ("sce", dict(), 3),
    ("nearswap", dict(t=0.05), 1),
    ("ram", dict(epsilon=0.05), 3),
    ("ramplus_tl", dict(r=0.5, alpha=0.5, epsilon=0.1), 3),
]


@pytest.mark.parametrize("name,params,n", BLOCKWISE, ids=[f"{b[0]}-{i}" for i, b in enumerate(BLOCKWISE)])
@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocks_equal_whole_tensors(name, params, n, block):
    """The executor's path (bf16 storage rounded to the recipe dtype, small blocks, whole-tensor
    statistics from prepare) gives what the whole-tensor call gives on the same rounded inputs."""
    method = get(name)
    assert method.blockwise
    base = rnd(12, 9, seed=20).to(torch.bfloat16)
    xs = [(base.double() + 0.1 * rnd(12, 9, seed=i)).to(torch.bfloat16) for i in range(n)]
    cast = torch.float16
    streamed = method.stream(base, xs, work=torch.float32, out_dtype=torch.float32, cast=cast, block=block, **params)
    whole = method(base.to(cast).float(), [x.to(cast).float() for x in xs], **params)
    torch.testing.assert_close(streamed, whole, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ through the recipe layer

def recipe(name, tiny, parameters=None, models=("ft1", "ft2", "ft3")):
    r = {"merge_method": name, "base_model": str(tiny["base"]), "models": [{"model": str(tiny[m])} for m in models]}
    if parameters is not None:
        r["parameters"] = parameters
    return r


RECIPES = {
    "sce": {"select_topk": 0.5},
    "nearswap": {"t": 2e-4},  # the matrices' deltas are ~2.5e-4, the norms' ~1e-2
    "ram": {"epsilon": 3e-4},
    "ramplus_tl": {"r": 0.5, "alpha": 0.5, "epsilon": 5e-4},
    "arcee_fusion": None,
}


@pytest.mark.parametrize("name", NEW)
def test_merge_end_to_end_matches_the_method(name, tiny, tmp_path):
    """Each method merges the tiny models through the executor, tensor for tensor what the function
    gives on the whole tensors."""
    models = ("ft1",) if name in ("nearswap", "arcee_fusion") else ("ft1", "ft2", "ft3")
    moerge.merge(recipe(name, tiny, RECIPES[name], models), tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(tiny["base"] / "model.safetensors")
    ins = [load_file(tiny[m] / "model.safetensors") for m in models]
    changed = 0
    for k, b in base.items():
        want = get(name)(b.clone(), [i[k].clone() for i in ins], **(RECIPES[name] or {}))
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)
        changed += int(not torch.equal(got[k], b))
    assert changed > 0


@pytest.mark.parametrize("name,params,message", [
    ("sce", {"select_topk": 1.5}, r"parameters\.select_topk: must be in \[0, 1\], got 1.5"),
    ("sce", {"select_topk": -0.1}, r"parameters\.select_topk: must be in \[0, 1\], got -0.1"),
    ("nearswap", {"t": -0.01}, r"parameters\.t: must be in \[0, inf\], got -0.01"),
    ("ram", {"epsilon": -1}, r"parameters\.epsilon: must be in \[0, inf\], got -1"),
    ("ramplus_tl", {"epsilon": 0}, r"parameters\.epsilon: must be in \(0, inf\], got 0"),
    ("ramplus_tl", {"r": -0.5}, r"parameters\.r: must be in \[0, inf\], got -0.5"),
    ("ramplus_tl", {"alpha": [0.1, -1]}, r"parameters\.alpha\[1\]: must be in \[0, inf\], got -1"),
    ("ram", {"epsilon": float("nan")}, r"parameters\.epsilon: must be a finite number"),
])
def test_out_of_range_parameters_are_refused_in_one_line(name, params, message, tiny):
    models = ("ft1",) if name == "nearswap" else ("ft1", "ft2")
    with pytest.raises(MoergeError, match=message) as e:
        moerge.plan(recipe(name, tiny, params, models))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("r,message", [
    ({"merge_method": "nearswap", "models": ["ft1"]}, "nearswap needs a base_model"),
    ({"merge_method": "nearswap", "models": ["ft1", "ft2"], "base": True, "parameters": {"t": 0.1}},
     "nearswap takes exactly 1 model(s) besides the base, got 2"),
    ({"merge_method": "nearswap", "models": ["ft1"], "base": True}, "needs parameter 't'"),
    ({"merge_method": "arcee_fusion", "models": ["ft1", "ft2"], "base": True}, "arcee_fusion takes exactly 1 model(s)"),
    ({"merge_method": "sce", "models": ["base"], "base": True}, "sce takes at least 1 model(s) besides the base, got 0"),
    ({"merge_method": "ram", "models": ["base"], "base": True}, "ram takes at least 1 model(s) besides the base, got 0"),
])
def test_structure_refused_in_one_line(r, message, tiny):
    rec = {"merge_method": r["merge_method"], "models": [{"model": str(tiny[m])} for m in r["models"]]}
    if r.get("base"):
        rec["base_model"] = str(tiny["base"])
    if "parameters" in r:
        rec["parameters"] = r["parameters"]
    with pytest.raises(MoergeError) as e:
        moerge.plan(rec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_mergekit_parameter_names_are_now_moerge_parameters(tiny):
    """select_topk, r, alpha are taken by these methods, so nothing is left only to mergekit; on another
    method they are still accepted with a warning (mergekit ignores them there too)."""
    assert not MERGEKIT_ONLY_PARAMS
    assert {"select_topk", "r", "alpha", "epsilon", "t"} <= all_param_names()
    r = recipe("ties", tiny, {"select_topk": 0.5}, ("ft1",))
    r["models"][0]["parameters"] = {"weight": 1.0}
    with pytest.warns(MoergeWarning, match="ties does not use 'select_topk'"):
        moerge.plan(r)
    # sce takes no weight (it computes its own): a mergekit recipe that sets one still plans
    r = recipe("sce", tiny, None, ("ft1", "ft2"))
    r["models"][0]["parameters"] = {"weight": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moerge.plan(r)
    assert any("sce does not use 'weight'" in str(w.message) for w in caught)
