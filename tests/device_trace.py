"""A trace that checks device paths on a machine without a GPU (issue 31): tensors sent "to the device"
through ``moerge.lm.device.send`` are followed through every torch call, and a call that mixes them
with a tensor made on the host (what CUDA refuses) is recorded, as is such a tensor made by a factory
without a device. Used by tests/test_device_trace.py."""

import torch
from torch.overrides import TorchFunctionMode

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.rand, torch.randn,
             torch.eye, torch.linspace, torch.as_tensor, torch.randint, torch.randperm}
TO_HOST = {"cpu", "numpy", "tolist", "item", "from_numpy"}


class DeviceTrace(TorchFunctionMode):
    """Tensors marked ``on`` are on "the device" (by storage, so views and Parameters of them too; marked
    tensors are held while tracing, so no host tensor can take over their addresses); what is computed from them is too; a factory call with
    an explicit ``device=`` is (the code asked for the device it read from a tensor); ``.to`` with a
    device is; ``.cpu()``/``.numpy()`` are not. A call whose tensors (0-d excepted: CUDA takes CPU scalars)
    are partly on the device and partly not is a violation."""

    def __init__(self):
        super().__init__()
        self._on: set[int] = set()  # storages on "the device" (a Parameter wrapping a sent tensor shares it)
        self._held: list[torch.Tensor] = []  # kept alive while tracing, so no host tensor reuses their addresses
        self.violations: list[str] = []

    def mark(self, t):
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr:
                self._on.add(ptr)
                self._held.append(t)
        elif isinstance(t, (list, tuple)):
            for x in t:
                self.mark(x)
        return t

    def on(self, t) -> bool:
        return t.untyped_storage().data_ptr() in self._on

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
        here = [t for t in seen if not self.on(t) and t.dim() > 0 and t.numel() > 0]  # cat skips empty 1-d ones
        name = getattr(func, "__name__", str(func))
        if there and here and name not in TO_HOST | {"to", "copy_"}:
            self.violations.append(f"{name}: {[tuple(t.shape) for t in there]} on the device with "
                                   f"{[tuple(t.shape) for t in here]} on the CPU")
        if name == "copy_" and there and here and self.on(args[0]) is False and args[0].dim() > 0:
            self.violations.append(f"copy_ into a CPU tensor {tuple(args[0].shape)} from the device")
        out = func(*args, **kwargs)
        if name in TO_HOST:  # on the CPU ``.cpu()`` returns the tensor itself: copy it, as from a device
            return out.clone() if isinstance(out, torch.Tensor) and self.on(out) else out
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
