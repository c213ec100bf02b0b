"""Merges on a device (``merge --device``, mergekit's ``--cuda``; issue 31), checked on a machine without
one: every method of the registry runs through the engine under a trace that treats the tensors the
engine sends "to the device" as living elsewhere, follows them through every torch call, and reports
any call that mixes them with a tensor made on the CPU (what CUDA refuses), and any such tensor made by
a factory without a device. A method that builds a mask or a buffer on the host without sending it
over fails here, not on a reviewer's GPU."""

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moerge
from moerge.engine import executor
from moerge.lm.tiny import make_base, make_finetune
from moerge.methods.registry import names

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.rand, torch.randn,
             torch.eye, torch.linspace, torch.as_tensor, torch.randint, torch.randperm}
TO_HOST = {"cpu", "numpy", "tolist", "item", "from_numpy"}


class DeviceTrace(TorchFunctionMode):
    """Tensors marked ``on`` are on "the device"; what is computed from them is too; a factory call with
    an explicit ``device=`` is (the code asked for the device it read from a tensor); ``.to`` with a
    device is; ``.cpu()``/``.numpy()`` are not. A call whose tensors (0-d excepted: CUDA takes CPU scalars)
    are partly on the device and partly not is a violation."""

    def __init__(self):
        super().__init__()
        self._on: dict[int, weakref.ref] = {}
        self.violations: list[str] = []

    def mark(self, t):
        if isinstance(t, torch.Tensor):
            self._on[id(t)] = weakref.ref(t)
        elif isinstance(t, (list, tuple)):
            for x in t:
                self.mark(x)
        return t

    def on(self, t) -> bool:
        ref = self._on.get(id(t))
        return ref is not None and ref() is t

    @staticmethod
    def _tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from DeviceTrace._tensors(y)
        elif isinstance(x, dict):
            for y in x.values():
                yield from DeviceTrace._tensors(y)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = list(self._tensors(args)) + list(self._tensors(kwargs))
        there = [t for t in seen if self.on(t)]
        here = [t for t in seen if not self.on(t) and t.dim() > 0]
        name = getattr(func, "__name__", str(func))
        if there and here and name not in TO_HOST | {"to", "copy_"}:
            self.violations.append(f"{name}: {[tuple(t.shape) for t in there]} on the device with "
                                   f"{[tuple(t.shape) for t in here]} on the CPU")
        if name == "copy_" and there and here and self.on(args[0]) is False and args[0].dim() > 0:
            self.violations.append(f"copy_ into a CPU tensor {tuple(args[0].shape)} from the device")
        out = func(*args, **kwargs)
        if name in TO_HOST:
            return out
        if name == "to":
            asked = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
            if asked or (there and self.on(args[0])):
                self.mark(out)
        elif func in FACTORIES:
            if "device" in kwargs:
                self.mark(out)
        elif there:
            self.mark(out)
        return out


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
    per_model = {k: v for k, v in params.items() if k in ("weight", "density", "epsilon", "data")}
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
    real = executor._on
    monkeypatch.setattr(executor, "_on", lambda t, device: trace.mark(real(t, device)))
    with trace:
        got = executor.merge_tensors(plan, device=torch.device("cpu"))
    assert not trace.violations, f"{method}: {trace.violations[:3]}"
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
