"""The compute dtype (moerge.lm.precision): a bf16 checkpoint computes in bf16 only where asked or where
the CPU multiplies bf16 faster; training over a bf16 base keeps float32 adapter weights and learns;
the Fisher of a bf16 model is summed in float32 and agrees with the float32 one."""

import json

import pytest
import torch
from typer.testing import CliRunner

from moerge.errors import MoergeError
from moerge.lm import base as base_model
from moerge.lm import precision


def test_compute_dtype_follows_the_checkpoint_the_cpu_and_the_setting(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    for fast in (True, False):
        monkeypatch.setattr(precision, "fast_bf16", lambda fast=fast: fast)
        assert precision.compute_dtype(torch.float32) == torch.float32  # a float32 checkpoint: always float32
        assert precision.compute_dtype(None) == torch.float32
        assert precision.compute_dtype(torch.float16) == torch.float32  # CPU float16 kernels are slow
        assert precision.compute_dtype(torch.bfloat16) == (torch.bfloat16 if fast else torch.float32)
        monkeypatch.setenv(precision.ENV, "float32")
        assert precision.compute_dtype(torch.bfloat16) == torch.float32
        monkeypatch.setenv(precision.ENV, "bf16")
        assert precision.compute_dtype(torch.bfloat16) == torch.bfloat16
        assert precision.compute_dtype(torch.float32) == torch.float32
        monkeypatch.delenv(precision.ENV)
    monkeypatch.setenv(precision.ENV, "half")
    with pytest.raises(MoergeError, match="MOERGE_DTYPE='half'"):
        precision.setting()
    assert precision.stored_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert precision.stored_dtype({"dtype": "float32"}) == torch.float32
    assert precision.stored_dtype({}) is None and precision.stored_dtype([1]) is None


def test_a_bf16_checkpoint_loads_in_the_dtype_asked(bf16_base, monkeypatch):
    assert json.loads((bf16_base / "config.json").read_text()).get("dtype") == "bfloat16"
    monkeypatch.setenv(precision.ENV, "bfloat16")
    model, _ = base_model.load(bf16_base)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    monkeypatch.setenv(precision.ENV, "float32")
    model, _ = base_model.load(bf16_base)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert base_model.load(bf16_base, dtype=torch.float32)[0].dtype == torch.float32


def test_training_over_a_bf16_base_keeps_float32_adapters_and_learns(bf16_base, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from moerge.train.expert import load_expert, train_expert

    monkeypatch.setenv(precision.ENV, "bfloat16")
    card = train_expert(tmp_path / "e", base=bf16_base, task="novowels", steps=60, progress=False)
    assert card.validation_accuracy >= 0.3 and card.final_loss < 0.5  # as in float32 (test_train.py)
    assert card.dtype == "bfloat16"
    saved = load_file(tmp_path / "e" / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    model, tok = load_expert(bf16_base, tmp_path / "e")
    assert model.get_base_model().dtype == torch.bfloat16
    from moerge.eval import evaluate

    assert evaluate(model, tok, ["novowels"], n=30)["novowels"] >= 0.3
    full = train_expert(tmp_path / "f", base=bf16_base, task="novowels", adapter="full", steps=2, n_train=32,
                        batch_size=8, progress=False)
    assert full.adapter == "full" and full.dtype == "float32"
    assert {t.dtype for t in load_file(tmp_path / "f" / "model.safetensors").values()} == {torch.float32}


def test_the_fisher_of_a_bf16_model_agrees_with_the_float32_one():
    from moerge.engine.stats import fisher
    from moerge.tasks import mixture

    model, tok = base_model.load(dtype=torch.float32)
    rows = mixture(["reverse"], "train", 8)
    want = fisher(model, tok, rows)
    got = fisher(model.to(torch.bfloat16), tok, rows)
    assert set(got) == set(want) and all(t.dtype == torch.float32 for t in got.values())
    for name, w in want.items():
        g = got[name]
        rel = float((g - w).abs().sum() / w.abs().sum().clamp(min=1e-12))
        assert rel < 0.1, (name, rel)  # bf16 gradients: a few percent off, summed in float32
    assert all(not p.requires_grad for p in model.parameters())


def test_dtype_option_is_checked(monkeypatch):
    from moerge.cli import app

    monkeypatch.setenv(precision.ENV, "auto")  # restored after the test: the option sets it for the process

    res = CliRunner().invoke(app, ["--dtype", "half", "tasks", "list"])
    assert res.exit_code == 1 and "--dtype half: give one of auto, float32, bfloat16" in res.output
    res = CliRunner().invoke(app, ["--dtype", "float32", "tasks", "list"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["--dtype", " ", "tasks", "list"])
    assert res.exit_code == 1 and "give one of" in res.output
    # after the command, as --threads: eval with a missing model fails on the model, not on the option
    res = CliRunner().invoke(app, ["eval", "--dtype", "half", "nowhere"])
    assert res.exit_code == 1 and "--dtype half" in res.output
    res = CliRunner().invoke(app, ["eval", "--dtype", "float32", "nowhere"])
    assert res.exit_code == 1 and "nowhere" in res.output and "--dtype" not in res.output


def test_the_speed_check_times_one_thread_and_restores_the_count(monkeypatch):
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    precision.fast_bf16.cache_clear()
    try:
        assert precision.fast_bf16() in (True, False)
    finally:
        precision.fast_bf16.cache_clear()
    assert seen == [1, before] and torch.get_num_threads() == before


def test_load_takes_a_dtype_name(bf16_base):
    assert base_model.load(bf16_base, dtype="float32")[0].dtype == torch.float32
    assert base_model.load(bf16_base, dtype="bf16")[0].dtype == torch.bfloat16
    with pytest.raises(MoergeError, match="dtype 'banana'"):
        base_model.load(bf16_base, dtype="banana")
