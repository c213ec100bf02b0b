"""Low-rank algebra (factorize, concat, refactor) and extract-lora from a full fine-tune."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moerge.errors import MoergeError
from moerge.experts.kinds import LowRank
from moerge.experts.lowrank import concat, factorize, refactor


def low_rank(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)


def test_factorize_recovers_a_low_rank_delta_and_reports_energy():
    d = low_rank(20, 12, 3, 0)
    a, b, energy = factorize(d, 3)
    assert a.shape == (3, 12) and b.shape == (20, 3) and energy == pytest.approx(1.0)
    torch.testing.assert_close(b @ a, d)
    s = torch.linalg.svdvals(d)
    _, _, e1 = factorize(d, 1)
    assert e1 == pytest.approx(float(s[0] ** 2 / (s**2).sum()))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       seed=st.integers(0, 100))
def test_concat_is_the_weighted_sum_and_refactor_keeps_it(m, n, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    ups = [LowRank(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), 0.5 + i) for i, r in enumerate(ranks)]
    w = [1.0, -0.5, 2.0][: len(ups)]
    want = sum(wi * u.delta() for wi, u in zip(w, ups))
    c = concat(ups, w)
    assert c.rank == sum(ranks)
    torch.testing.assert_close(c.delta(), want, rtol=1e-4, atol=1e-4)
    full, kept = refactor(c, sum(ranks))
    torch.testing.assert_close(full.delta(), want, rtol=1e-3, atol=1e-3)
    assert kept == pytest.approx(1.0)
    one, kept1 = refactor(c, 1)
    s = torch.linalg.svdvals(want.double())
    assert kept1 == pytest.approx(float(s[0] ** 2 / (s**2).sum()), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(one.delta().double(), factorize(want.double(), 1)[1] @ factorize(want.double(), 1)[0],
                               rtol=1e-3, atol=1e-3)


def test_extract_lora_from_a_fine_tune(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from moerge.cli import app

    base = load_file(tiny["base"] / "model.safetensors")
    ft = {}
    for i, (k, v) in enumerate(base.items()):
        if v.dim() == 2 and "embed" not in k and "lm_head" not in k:
            v = v + 0.05 * low_rank(*v.shape, 2, i).float() / v.shape[1] ** 0.5
        elif k == "model.norm.weight":
            v = v + 0.1
        ft[k] = v.contiguous()
    (tmp_path / "ft").mkdir()
    save_file(ft, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ft" / "config.json").write_text((tiny["base"] / "config.json").read_text())
    res = CliRunner().invoke(app, ["expert", "extract", str(tmp_path / "ft"), "--base", str(tiny["base"]), "--rank", "2",
                                   "--out", str(tmp_path / "lora")])
    assert res.exit_code == 0, res.output
    assert "mean energy kept 100.0%" in res.output and "model.norm.weight" in res.output
    report = json.loads((tmp_path / "lora" / "moerge_extract.json").read_text())
    assert all(r["energy"] > 0.9999 for r in report["layers"]) and report["not_extracted"][0]["tensor"] == "model.norm.weight"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), tmp_path / "lora").merge_and_unload().state_dict()
    for k, v in ft.items():
        if k != "model.norm.weight" and k in merged:
            torch.testing.assert_close(merged[k], v, rtol=1e-4, atol=1e-5, msg=k)
    res = CliRunner().invoke(app, ["expert", "extract", str(tiny["base"]), "--base", str(tiny["base"]), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "nothing to extract" in res.output and not (tmp_path / "x").exists()
    with pytest.raises(MoergeError, match="at least 1"):
        from moerge.experts.extract import extract_lora

        extract_lora(tmp_path / "ft", tiny["base"], tmp_path / "y", rank=0)


def test_combine_lora_adapters_exactly_and_at_a_rank(tiny, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from moerge.cli import app

    torch.manual_seed(0)
    for name, targets in (("a", ["q_proj", "v_proj"]), ("b", ["q_proj", "down_proj"])):
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["base"]),
                           LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        m.save_pretrained(tmp_path / name)

    def merged(folder):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), folder).merge_and_unload().state_dict()

    base = load_file(tiny["base"] / "model.safetensors")
    sa, sb = merged(tmp_path / "a"), merged(tmp_path / "b")
    want = {k: base[k] + 0.5 * (sa[k] - base[k]) + 2.0 * (sb[k] - base[k]) for k in base}
    run = CliRunner().invoke(app, ["expert", "combine", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(tiny["base"]),
                                   "--weights", "0.5,2", "--out", str(tmp_path / "c")])
    assert run.exit_code == 0, run.output
    got = merged(tmp_path / "c")
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    run = CliRunner().invoke(app, ["expert", "combine", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(tiny["base"]),
                                   "--rank", "1", "--out", str(tmp_path / "r1")])
    assert run.exit_code == 0 and "lowest energy kept" in run.output
    kept = json.loads((tmp_path / "r1" / "moerge_combine.json").read_text())["energy_kept"]
    q = "model.layers.0.self_attn.q_proj.weight"  # rank 4 (2 + 2) cut to 1; v_proj (rank 2) too
    assert 0 < kept[q] < 1
    delta = merged(tmp_path / "r1")[q] - base[q]
    assert torch.linalg.matrix_rank(delta.double(), atol=1e-5) == 1
    run = CliRunner().invoke(app, ["expert", "combine", str(tmp_path / "a"), "--base", str(tiny["base"]), "--weights", "1,2",
                                   "--out", str(tmp_path / "x")])
    assert run.exit_code == 1 and "one weight per adapter" in run.output
