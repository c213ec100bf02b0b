"""Running an input model forward one decoder layer at a time, its weights read from the lazy source
only while that layer runs (the way GPTQ-style quantizers calibrate).

Statistics of a layer's inputs (RegMean's Gram matrices) need every example to pass through the model,
but not the whole model in memory: the examples' hidden states go through layer 1, then layer 2, and
so on, and each layer's weights are loaded, used on every batch, and dropped. Peak memory is one
layer's weights, the modules outside the layers (embeddings, final norm, head) and the examples'
hidden states, whatever the model's depth: a 7B model's statistics need about one layer's gigabyte,
not the model's 28 GB in float32.

It is generic over transformers' decoder models: the skeleton is built with its parameters on the
meta device (buffers, such as rotary frequencies, computed as usual), the decoder layers are the
model's ModuleList of ``num_hidden_layers`` blocks, and whatever the model passes its first layer
(position embeddings, the attention mask in whichever form the attention implementation wants) is
caught once per batch and handed to every layer, as the model itself would.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from moerge.errors import MoergeError
from moerge.lm import device as devices
from moerge.lm.arch import checkpoint_reader


class _Caught(Exception):
    """Raised by the hook on the first decoder layer: the model's forward stops there."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter created inside lands on the meta device (no memory); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _blocks(model: torch.nn.Module, cfg) -> tuple[str, torch.nn.ModuleList] | None:
    """(prefix, the decoder layers): the shallowest ModuleList of ``num_hidden_layers`` modules (a
    mixture of experts' list inside a layer may have as many)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    want = getattr(text, "num_hidden_layers", None)
    exact = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == want and want]
    return min(exact, key=lambda nm: nm[0].count(".")) if exact else None


class LayerwiseModel:
    """An opened model (``plan.Model``) as a float32 skeleton whose decoder layers are loaded one at a
    time; the modules outside them (embeddings, final norm, head) are loaded once."""

    def __init__(self, model_ref, device: torch.device | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            from transformers.initialization import no_init_weights  # transformers 5
        except ImportError:  # pragma: no cover
            from transformers.modeling_utils import no_init_weights
        try:
            cfg = AutoConfig.from_pretrained(str(model_ref.folder))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise MoergeError(f"{model_ref.ref}: cannot read its config.json ({first}); this needs the model's forward") from None
        with no_init_weights(), _params_on_meta():
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.tie_weights()
        self.ref = model_ref.ref
        self.source = model_ref.source
        self.read = checkpoint_reader(cfg.model_type, model_ref.source)  # the model's names, the checkpoint's tensors
        self.device = device  # where the layers run (None: the CPU): weights are sent there as each layer loads
        devices.send_module(model, device)  # what the skeleton holds already (rotary frequencies) goes there once
        self.model = model.eval()
        self._tuples = False  # whether the layers return tuples (older transformers) or tensors; set by run
        found = _blocks(model, cfg)
        if found is None:
            raise MoergeError(f"{self.ref}: cannot find its decoder layers (a list of {cfg.num_hidden_layers} blocks)")
        self.prefix, self.layers = found
        # a parameter reachable under several names (a tied head) is read once, under its first name
        self.alias: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            self.alias[name] = first.setdefault(id(t), name)
        self._load(model, "", skip=self.prefix + ".")

    # ------------------------------------------------------------------------------ weights
    def tensor(self, name: str) -> torch.Tensor:
        """The float32 tensor of a parameter of the model, from the lazy source (adapters applied)."""
        key = self.alias.get(name, name)
        t = self.read(key) if key != name else None
        t = self.read(name) if t is None else t
        if t is None:
            raise MoergeError(f"{self.ref}: lacks tensor {key!r} its config implies; is it a complete checkpoint?")
        return t.to(torch.float32)

    def _load(self, module: torch.nn.Module, prefix: str, skip: str | None = None) -> None:
        """Give every meta parameter under ``module`` its weights (tied ones share one tensor)."""
        loaded: dict[str, torch.nn.Parameter] = {}
        for mname, mod in module.named_modules(prefix=prefix.rstrip(".")):
            if skip and (mname + ".").startswith(skip):
                continue
            for pname, p in list(mod._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                full = f"{mname}.{pname}" if mname else pname
                key = self.alias.get(full, full)
                if key not in loaded:
                    loaded[key] = torch.nn.Parameter(devices.send(self.tensor(full), self.device), requires_grad=False)
                mod._parameters[pname] = loaded[key]

    @staticmethod
    def _drop(module: torch.nn.Module) -> None:
        for mod in module.modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[pname] = torch.nn.Parameter(p.to("meta"), requires_grad=False)

    # ------------------------------------------------------------------------------ running
    @torch.no_grad()
    def run(self, batches: list[dict], visit: Callable[[str, torch.nn.Module, int], None] | None = None,
            tail: bool = False) -> None:
        """Every batch (``input_ids``, ``attention_mask``) through every layer. Before a layer runs
        batch ``b``, ``visit(prefix, layer, b)`` is called (hooks on the layer see its inputs). With
        ``tail``, the modules after the last layer run too, each batch announced as
        ``visit("", model, b)`` (a hook on an untied head sees its inputs)."""
        caught: list[_Caught] = []
        stop = self.layers[0].register_forward_pre_hook(lambda m, a, k: (_ for _ in ()).throw(_Caught(a, k)),
                                                        with_kwargs=True)
        try:
            for batch in batches:
                try:
                    self.model(input_ids=devices.send(batch["input_ids"], self.device),
                               attention_mask=devices.send(batch["attention_mask"], self.device), use_cache=False)
                except _Caught as c:
                    caught.append(c)
                else:  # pragma: no cover - every decoder model calls its first layer
                    raise MoergeError(f"{self.ref}: its forward never reached its first decoder layer")
        finally:
            stop.remove()
        states = [c.args[0] if c.args else c.kwargs["hidden_states"] for c in caught]
        for i, layer in enumerate(self.layers):
            prefix = f"{self.prefix}.{i}"
            self._load(layer, prefix + ".")
            try:
                for b, c in enumerate(caught):
                    if visit is not None:
                        visit(prefix, layer, b)
                    args, kwargs = c.args, dict(c.kwargs)
                    if args:
                        args = (states[b],) + tuple(args[1:])
                    else:
                        kwargs["hidden_states"] = states[b]
                    out = layer(*args, **kwargs)
                    self._tuples = isinstance(out, tuple)
                    states[b] = out[0] if self._tuples else out
            finally:
                self._drop(layer)
        if tail:
            with self._replaying(states) as replay:
                for b, batch in enumerate(batches):
                    replay[0] = b
                    if visit is not None:
                        visit("", self.model, b)
                    self.model(input_ids=devices.send(batch["input_ids"], self.device),
                               attention_mask=devices.send(batch["attention_mask"], self.device), use_cache=False)

    @contextmanager
    def _replaying(self, states: list[torch.Tensor]) -> Iterator[list[int]]:
        """The model with its layers bypassed: the last one returns the batch's final hidden states
        computed layer by layer, so the model's own code applies what follows them."""
        current = [0]
        last = self.layers[len(self.layers) - 1]

        def replay(module, args, kwargs, out):
            return (states[current[0]],) + tuple(out[1:]) if isinstance(out, tuple) else states[current[0]]

        saved = [layer.forward for layer in self.layers]

        def passthrough(*a, **k):  # each layer returns its input (as the layers return it): no weights needed
            x = a[0] if a else k["hidden_states"]
            return (x,) if self._tuples else x

        for layer in self.layers:
            layer.forward = passthrough
        h = last.register_forward_hook(replay, with_kwargs=True)
        try:
            yield current
        finally:
            h.remove()
            for layer, f in zip(self.layers, saved):
                layer.forward = f
