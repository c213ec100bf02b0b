"""The device paths (``--device``; issue 31), checked on a machine without a GPU: merges (every method of
the registry, through the engine), the data-aware statistics and the mixture runtime (routing, every
kind of router, dense and MoE bases) run under a trace (``device_trace.py``) that treats what moerge
sends "to the device" as living elsewhere, follows it through every torch call, and reports any call
that mixes it with a tensor made on the host (what CUDA refuses). Code that builds a mask, a buffer or
a batch on the host without sending it over fails here, not on a reviewer's GPU."""

import pytest
import torch
from device_trace import DeviceTrace

import moerge
from moerge.engine import executor
from moerge.lm import device as devices
from moerge.lm.tiny import make_base, make_finetune
from moerge.methods.registry import names


def test_the_trace_catches_a_cpu_tensor_mixed_with_device_ones():
    with DeviceTrace() as trace:
        x = trace.mark(torch.ones(4, device="cpu"))
        _ = x + torch.zeros(4)  # made without a device: on the CPU
        _ = x + torch.zeros(4, device=x.device) + torch.tensor(2.0)  # explicit device, and a 0-d scalar: fine
    assert len(trace.violations) == 1 and trace.violations[0].startswith("add")


RECIPES = {
    "passthrough": ({}, 1, False), "linear": ({"weight": 0.5}, 2, False), "task_arithmetic": ({"weight": 0.5}, 2, True),
    "ties": ({"weight": 0.5, "density": 0.5}, 2, True), "dare_ties": ({"weight": 0.5, "density": 0.5}, 2, True),
    "dare_linear": ({"weight": 0.5, "density": 0.5}, 2, True), "breadcrumbs": ({"weight": 0.5, "density": 0.8}, 2, True),
    "breadcrumbs_ties": ({"weight": 0.5, "density": 0.8}, 2, True),
    "della": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, 2, True),
    "della_linear": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, 2, True),
    "sce": ({"select_topk": 0.5}, 2, True), "ram": ({}, 2, True), "ramplus_tl": ({}, 2, True),
    "model_stock": ({}, 2, True), "karcher": ({}, 2, False), "nuslerp": ({"weight": 0.5}, 2, False),
    "multislerp": ({"weight": 0.5}, 2, True), "slerp": ({"t": 0.3}, 1, True), "nearswap": ({"t": 0.01}, 1, True),
    "arcee_fusion": ({}, 1, True), "fisher": ({"weight": 0.5, "data": "sort", "num_examples": 2}, 2, False),
    "regmean": ({"weight": 0.5, "data": "sort", "num_examples": 2}, 2, False),
    "tsv": ({"alpha": 1.0}, 2, True), "wudi": ({"steps": 3}, 2, True), "iso_c": ({"alpha": 1.0}, 2, True), "iso_cts": ({"alpha": 1.0, "common": 0.5}, 2, True),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-device")
    base = make_base(root / "base", hidden=32, layers=1, intermediate=64)
    return base, [make_finetune(base, root / f"ft{i}", seed=i) for i in (1, 2)]


def test_every_method_is_covered():
    assert set(RECIPES) == set(names())


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_every_method_computes_where_the_engine_sends_its_inputs(method, models, monkeypatch):
    base, fts = models
    params, n, with_base = RECIPES[method]
    per_model = {k: v for k, v in params.items() if k in ("weight", "density", "epsilon", "data")}  # the rest shared
    shared = {k: v for k, v in params.items() if k not in per_model}
    recipe = {"merge_method": method, "models": [{"model": str(f), "parameters": per_model} for f in fts[:n]]}
    if with_base or method in ("slerp", "nearswap", "arcee_fusion"):
        recipe["base_model"] = str(base)
    if shared:
        recipe["parameters"] = shared
    plan = moerge.plan(recipe, seed=0)
    executor.ensure_stats(plan, False)  # data-aware: the statistics first, outside the trace
    want = executor.merge_tensors(plan)
    trace = DeviceTrace()
    real = devices.send
    monkeypatch.setattr(devices, "send", lambda t, device: trace.mark(real(t, device)))
    with trace:
        got = executor.merge_tensors(plan, device=torch.device("cpu"))
    assert not trace.violations, f"{method}: {trace.violations[:3]}"
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_data_aware_statistics_compute_where_they_are_sent(models, monkeypatch, tmp_path):
    """Fisher (the whole model) and the Gram matrices (layer by layer) on a named device: under the same
    trace every weight and batch goes through ``lm.device.send`` and nothing is mixed with the host;
    the statistics equal the CPU's."""
    from moerge.engine import stats
    from moerge.lm.device import ENV

    base, fts = models
    recipe = {"merge_method": "regmean", "models": [{"model": str(f), "parameters": {"weight": 0.5, "data": "sort",
                                                                                        "num_examples": 2}} for f in fts]}
    plan = moerge.plan(recipe)
    for kind in ("gram", "fisher"):
        want_dir, got_dir = tmp_path / f"{kind}-cpu", tmp_path / f"{kind}-dev"
        monkeypatch.setattr(stats, "cache_root", lambda d=want_dir: d)
        monkeypatch.delenv(ENV, raising=False)
        rows, _ = stats.rows_for(plan.models[0], "sort", 2)
        want = stats.compute(plan.models[0], kind, rows, "sort")
        monkeypatch.setattr(stats, "cache_root", lambda d=got_dir: d)
        monkeypatch.setenv(ENV, "cpu")  # named: the statistics take the device path
        trace = DeviceTrace()
        real = devices.send
        sent = []
        monkeypatch.setattr(devices, "send", lambda t, device: sent.append(device) or trace.mark(real(t, device)))
        with trace:
            got = stats.compute(plan.models[0], kind, rows, "sort")
        monkeypatch.setattr(devices, "send", real)
        assert sent and all(d == torch.device("cpu") for d in sent), kind
        assert not trace.violations, f"{kind}: {trace.violations[:3]}"
        assert got.names == want.names
        for n in want.names:
            torch.testing.assert_close(got.get(n), want.get(n), msg=f"{kind} {n}")


@pytest.fixture(scope="module")
def routing_bases(tmp_path_factory):
    """A dense base with two trained experts (cards with centroids, PHATGOOSE gates), and an MoE base
    with two LoRA experts on its stacked experts and router."""
    from moerge.api import train_expert
    from moerge.lm.tiny import make_random_adapter

    root = tmp_path_factory.mktemp("route-trace")
    dense = make_base(root / "dense", hidden=32, layers=2, intermediate=64)
    experts = [root / t for t in ("sort", "reverse")]
    for e in experts:
        train_expert(e, base=dense, task=e.name, steps=2, n_train=16, batch_size=8, n_val=20, gate_steps=2, progress=False)
    moe = make_base(root / "mixtral", arch="mixtral", hidden=32, intermediate=64)
    moe_experts = [make_random_adapter(moe, root / f"moe-{seed}", seed=seed) for seed in (0, 1)]
    return {"dense": (dense, experts), "moe": (moe, moe_experts)}


@pytest.mark.parametrize("router,which", [("centroid", "dense"), ("arrow", "dense"), ("phatgoose", "dense"),
                                          ("smear", "dense"), ("uniform", "moe"), ("arrow", "moe")])
def test_the_mixture_runtime_and_routers_compute_where_the_model_is(router, which, routing_bases, monkeypatch):
    """A routed model whose weights, banks, router tensors and inputs were all sent to the device:
    routing a batch and generating from it mixes nothing with the host, and answers as on the CPU."""
    from moerge.lm import base as base_model
    from moerge.lm.device import send_module
    from moerge.routing import load_routed
    from moerge.routing.model import RoutedModel, gather_experts
    from moerge.routing.registry import get

    base, experts = routing_bases[which]
    ids = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 60, 61, 62, 63, 64]])
    with torch.no_grad():
        want = load_routed(router, experts=experts, base=base)(ids).logits
    loaded, cards, base_dir = gather_experts(experts, base=base)
    model, tok = base_model.load(base_dir)
    trace = DeviceTrace()
    real = devices.send
    monkeypatch.setattr(devices, "send", lambda t, device: trace.mark(real(t, device)))
    with trace:
        send_module(model, torch.device("cpu"))  # as base.load sends a model to a GPU
        routed = RoutedModel(model, tok, loaded, cards, get(router)())  # banks, router tensors: sent as built
        with torch.no_grad():
            got = routed(devices.send(ids, torch.device("cpu"))).logits
            routed.generate(devices.send(ids, torch.device("cpu")), max_new_tokens=3, do_sample=False)
    assert not trace.violations, f"{router} on {which}: {trace.violations[:3]}"
    torch.testing.assert_close(got, want)
