"""An input or output of a merge as a runnable transformers model (most of the engine only streams
tensors): MoE router rows and merge statistics run inputs forward; a merge search scores outputs
built in memory."""

from __future__ import annotations

import torch

from moerge.errors import MoergeError
from moerge.lm.arch import checkpoint_reader


def _filled(cfg, dtype: torch.dtype, get, where: str, **kw):
    """A model of config ``cfg`` built without initialising its weights, then given ``get(name)`` for
    every tensor of its state dict (None: absent; a tied head may be); ``kw`` to ``from_config``."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # pragma: no cover
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
    sd = {}
    for name in model.state_dict():
        t = get(name)
        if t is not None:
            sd[name] = t.to(dtype)
        elif not (name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False)):
            raise MoergeError(f"{where}: lacks tensor {name!r} its config implies; is it a complete {cfg.model_type} checkpoint?")
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.eval()


def load_dense(model_ref, dtype: torch.dtype, **kw):
    """An opened model (``plan.Model``) as a transformers model in ``dtype``, its weights read from the
    lazy source, so adapters (``base+adapter``, ``library://``) apply as they do everywhere else;
    ``kw`` to transformers' ``from_config`` (``attn_implementation``)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(model_ref.folder))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MoergeError(f"{model_ref.ref}: cannot read its config.json ({first}); this needs the model's forward") from None
    return _filled(cfg, dtype, checkpoint_reader(cfg.model_type, model_ref.source), model_ref.ref, **kw)


def model_from_tensors(config: dict, tensors: dict[str, torch.Tensor]):
    """A float32 transformers causal LM of a config dict (a plan's output ``config``) holding
    ``tensors`` (a merge made in memory)."""
    from transformers import AutoConfig

    cfg = dict(config)
    try:
        cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except (KeyError, ValueError) as e:
        raise MoergeError(f"the merge's config cannot build a model ({e}); it needs a model_type transformers knows") from None
    return _filled(cfg, torch.float32, checkpoint_reader(cfg.model_type, _Tensors(tensors)), "the merge")


class _Tensors(dict):
    """A dict of tensors as a tensor source (``names``, ``get``, ``in``)."""

    def names(self) -> list[str]:
        return list(self)


def load_tokenizer(model_ref, needed_for: str):
    """An opened model's tokenizer, with a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_ref.folder))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MoergeError(f"{model_ref.ref}: its tokenizer does not load ({first}); {needed_for} needs it") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
