"""MoE from dense models (mergekit-moe configs): moerge/moe/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.errors import MoergeError

PROMPTS = {
    "ft1": (["def f(x): return x", "import os"], ["the cat sat on the mat"]),
    "ft2": (["What is 2+2?", "Solve for x: 3x = 9"], None),
    "ft3": (["Once upon a time", "The dragon said"], None),
}


def config(tiny, mode="cheap_embed", experts=("ft1", "ft2"), extra="", per_token=1) -> str:
    lines = [f"base_model: {tiny['base']}", f"gate_mode: {mode}", f"experts_per_token: {per_token}", "experts:"]
    for e in experts:
        pos, neg = PROMPTS[e]
        lines.append(f"  - source_model: {tiny[e]}")
        lines.append(f"    positive_prompts: {pos!r}".replace("'", '"'))
        if neg:
            lines.append(f"    negative_prompts: {neg!r}".replace("'", '"'))
    return "\n".join(lines) + "\n" + extra


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "moe.yaml"
    p.write_text(text)
    return p


def tokens(tok, prompt: str) -> list[int]:
    return tok(tok.bos_token + prompt, add_special_tokens=False)["input_ids"]


def normed(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def test_cheap_embed_moe_loads_generates_and_copies_experts(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "moe"
    res = moerge.merge(write(tmp_path, config(tiny, "cheap_embed", ("ft1", "ft2", "ft3"), per_token=2)), out)
    assert res.out_dir == out and (out / "README.md").is_file() and (out / "moerge_recipe.yaml").is_file()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    tok = AutoTokenizer.from_pretrained(out)
    gen = model.generate(**tok("hi", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > 3

    sd = load_file(out / "model.safetensors")
    base = load_file(tiny["base"] / "model.safetensors")
    for e, name in enumerate(("ft1", "ft2", "ft3")):
        src = load_file(tiny[name] / "model.safetensors")
        for layer in range(3):
            for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                assert torch.equal(sd[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"],
                                   src[f"model.layers.{layer}.mlp.{proj}.weight"])
    for k, v in base.items():
        if ".mlp." not in k:
            assert torch.equal(sd[k], v), k
    assert not any(".mlp." in k for k in sd)

    # router rows: an independent computation, prompt by prompt, without padding
    emb = base["model.embed_tokens.weight"]
    btok = AutoTokenizer.from_pretrained(tiny["base"])

    def cheap(prompts):
        return normed(sum(emb[tokens(btok, p)].sum(0) for p in prompts))

    for e, name in enumerate(("ft1", "ft2", "ft3")):
        pos, neg = PROMPTS[name]
        want = cheap(pos) - cheap(neg) if neg else cheap(pos)
        for layer in range(3):
            got = sd[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e]
            torch.testing.assert_close(got, normed(want), atol=1e-6, rtol=1e-5)


def test_hidden_router_rows_match_an_independent_forward(tiny, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "moe"
    moerge.merge(write(tmp_path, config(tiny, "hidden")), out)
    sd = load_file(out / "model.safetensors")
    base = LlamaForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32).eval()
    btok = AutoTokenizer.from_pretrained(tiny["base"])

    def entering(prompts):  # (layers, hidden): state entering each layer at the last token, mean over prompts
        rows = []
        for p in prompts:
            with torch.no_grad():
                hs = base(torch.tensor([tokens(btok, p)]), output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0, -1] for h in hs[:-1]]))
        return torch.stack(rows).mean(0)

    for e, name in enumerate(("ft1", "ft2")):
        pos, neg = PROMPTS[name]
        want = normed(entering(pos) - entering(neg) if neg else entering(pos))
        for layer in range(3):
            torch.testing.assert_close(sd[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e], want[layer],
                                       atol=2e-5, rtol=1e-4)
    # the layers differ (not one row repeated, as cheap_embed gives)
    assert not torch.allclose(sd["model.layers.0.block_sparse_moe.gate.weight"], sd["model.layers.2.block_sparse_moe.gate.weight"])


def test_random_gates_seeded_and_noise_residual(tiny, tmp_path):
    text = config(tiny, "uniform_random", extra="seed: 7\n")
    text = text.replace("    negative_prompts", "    residual_scale: 0.5\n    negative_prompts", 1)
    a, b = tmp_path / "a", tmp_path / "b"
    moerge.merge(write(tmp_path, text), a)
    moerge.merge(write(tmp_path, text), b)
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    g = sa["model.layers.1.block_sparse_moe.gate.weight"]
    assert torch.equal(g, sb["model.layers.1.block_sparse_moe.gate.weight"])
    assert g.shape == (2, 32) and g.abs().max() <= 32 ** -0.5
    src = load_file(tiny["ft1"] / "model.safetensors")
    torch.testing.assert_close(sa["model.layers.0.block_sparse_moe.experts.0.w2.weight"], 0.5 * src["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(sa["model.layers.0.block_sparse_moe.experts.0.w1.weight"], src["model.layers.0.mlp.gate_proj.weight"])
    c = tmp_path / "c"
    moerge.merge(write(tmp_path, config(tiny, "random").replace("    negative_prompts", "    noise_scale: 0.01\n    negative_prompts", 1)), c,
                 seed=3)
    sc = load_file(c / "model.safetensors")
    d = sc["model.layers.0.block_sparse_moe.experts.0.w1.weight"] - src["model.layers.0.mlp.gate_proj.weight"]
    assert 0.005 < d.std() < 0.02


def test_dry_run_plan_and_dtype(tiny, tmp_path):
    plan = moerge.plan(write(tmp_path, config(tiny, "random", extra="dtype: bfloat16\n")))
    text = plan.summary()
    assert "Mixtral" in text and "experts per token: 1 of 2" in text and "bfloat16" in text
    assert all(t.dtype == torch.bfloat16 for t in plan.tasks)


BAD = [
    ("gate_mode: hiden\n", "gate_mode", "unknown gate_mode 'hiden'"),
    ("experts_per_token: 3\n", "experts_per_token", "only 2 experts"),
    ("shared_experts: [{source_model: x}]\n", "shared_experts[0].source_model", "no such file"),
    ("shared_experts: [{source_model: x}, {source_model: y}]\n", "shared_experts", "at most one shared expert"),
    ("merge_methd: ties\n", "merge_methd", "unknown key"),
    ("architecture: qwen\n", "architecture", "Qwen MoE needs exactly one shared expert; Qwen3 MoE needs qwen3"),
    ("architecture: gpt\n", "architecture", "matches no output architecture"),
    ("dtype: int8\n", "dtype", "unknown dtype"),
]


@pytest.mark.parametrize("extra,key,words", BAD)
def test_bad_configs_are_one_line_with_the_line(tiny, tmp_path, extra, key, words):
    text = config(tiny).replace("experts_per_token: 1\n", "") + extra
    line = text.splitlines().index(extra.strip()) + 1
    with pytest.raises(MoergeError) as e:
        moerge.plan(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg and f"line {line}" in msg and key in msg and words in msg, msg


def test_bad_expert_entries(tiny, tmp_path):
    text = config(tiny, "hidden").replace('    positive_prompts: ["What is 2+2?", "Solve for x: 3x = 9"]\n', "")
    with pytest.raises(MoergeError, match=r"line 8: experts\[1\]: has no positive_prompts"):
        moerge.plan(write(tmp_path, text))
    text = config(tiny).replace("    negative_prompts", "    noise_scale: -1\n    negative_prompts")
    with pytest.raises(MoergeError, match=r"line 7: experts\[0\]\.noise_scale: must be >= 0"):
        moerge.plan(write(tmp_path, text))
    text = config(tiny).replace(str(tiny["ft2"]), str(tiny["root"] / "nope"))
    with pytest.raises(MoergeError, match=r"line 8: experts\[1\]\.source_model: .*nope"):
        moerge.plan(write(tmp_path, text))
    same = config(tiny).replace(str(tiny["ft2"]), str(tiny["ft1"]))
    with pytest.raises(MoergeError, match=r"line 8: experts\[1\]\.source_model: every expert is"):
        moerge.plan(write(tmp_path, same))
    assert moerge.plan(write(tmp_path, same), allow_same_experts=True).tasks


def test_nothing_left_behind_on_failure(tiny, tmp_path, monkeypatch):
    from moerge.moe import build

    calls = {"n": 0}
    real = build.produce

    def failing(plan, task, routers):
        calls["n"] += 1
        if calls["n"] == 10:
            raise MoergeError("boom")
        return real(plan, task, routers)

    monkeypatch.setattr(build, "produce", failing)
    out = tmp_path / "out" / "moe"
    with pytest.raises(MoergeError, match="boom"):
        moerge.merge(config(tiny), out)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_cli_moe_and_merge(tiny, tmp_path):
    from typer.testing import CliRunner

    from moerge.cli import app

    cfg = write(tmp_path, config(tiny))
    r = CliRunner().invoke(app, ["moe", str(cfg), str(tmp_path / "a"), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "b"), "-q"])
    assert r.exit_code == 0, r.output
    assert load_file(tmp_path / "a" / "model.safetensors").keys() == load_file(tmp_path / "b" / "model.safetensors").keys()
    r = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "c"), "--dry-run"])
    assert r.exit_code == 0 and "Mixtral" in r.output and not (tmp_path / "c").exists()
    bad = write(tmp_path, config(tiny) + "gate_mode: nope\n")
    r = CliRunner().invoke(app, ["moe", str(bad), str(tmp_path / "d")])
    assert r.exit_code == 1 and "error:" in r.output and "gate_mode" in r.output


def test_adapter_expert(tiny, tmp_path):
    """A dense expert given as base+adapter: its MLP is the adapter applied to the base (as peft merges it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["base"]),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    text = config(tiny).replace(f"source_model: {tiny['ft2']}", f"source_model: {tiny['base']}+{tmp_path / 'adapter'}")
    moerge.merge(write(tmp_path, text), tmp_path / "moe")
    sd = load_file(tmp_path / "moe" / "model.safetensors")
    for layer in range(3):
        for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            torch.testing.assert_close(sd[f"model.layers.{layer}.block_sparse_moe.experts.1.{w}.weight"],
                                       merged[f"model.layers.{layer}.mlp.{proj}.weight"], atol=1e-6, rtol=1e-5)
    assert "+" in (tmp_path / "moe" / "moerge_recipe.yaml").read_text()


def test_multi_document_with_moe_refused(tiny, tmp_path):
    text = "name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\n" + config(tiny)
    with pytest.raises(MoergeError, match="document 2 is an MoE config"):
        moerge.load_recipe(write(tmp_path, text))


def test_library_gate_mode(tiny, tmp_path):
    """gate_mode library: experts from a moerge library, router rows = their cards' task centroids."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moerge.library import Library

    lib = Library.init(tmp_path / "lib", tiny["base"])
    centroids = {}
    for i, (name, prompts) in enumerate((("code", PROMPTS["ft1"][0]), ("math", PROMPTS["ft2"][0]))):
        torch.manual_seed(i)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["base"]),
                       LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False)).save_pretrained(tmp_path / name)
        centroids[name] = torch.tensor(lib.add(tmp_path / name, name, prompts=prompts * 4).card["centroid"])
    text = (f"base_model: {tiny['base']}\ngate_mode: library\nexperts_per_token: 1\nexperts:\n"
            "  - source_model: library://code\n  - source_model: library://math\n")
    cfg = write(tmp_path, text)
    moerge.merge(cfg, tmp_path / "moe", library=tmp_path / "lib")
    sd = load_file(tmp_path / "moe" / "model.safetensors")
    for layer in range(3):
        g = sd[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(g[0], normed(centroids["code"]))
        torch.testing.assert_close(g[1], normed(centroids["math"]))
    assert "library://code@1" in (tmp_path / "moe" / "moerge_recipe.yaml").read_text()
    # a shared expert from the library is gated by its centroid (Qwen MoE output)
    moerge.merge(write(tmp_path, text + "architecture: qwen\nshared_experts:\n  - source_model: library://math\n"), tmp_path / "qmoe",
                 library=tmp_path / "lib")
    sd = load_file(tmp_path / "qmoe" / "model.safetensors")
    torch.testing.assert_close(sd["model.layers.2.mlp.shared_expert_gate.weight"][0], normed(centroids["math"]))
    bad = write(tmp_path, text.replace("library://math", str(tiny["ft2"])))
    with pytest.raises(MoergeError, match=r"line 6: experts\[1\]\.source_model: gate_mode library .* library://NAME"):
        moerge.plan(bad, library=tmp_path / "lib")


# ------------------------------------------------------------ other output architectures


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from moerge.lm.tiny import make_base, make_finetune

    root = tmp_path_factory.mktemp("qwen3")
    base = make_base(root / "base", seed=0, hidden=32, layers=2, intermediate=64, arch="qwen3")
    return {"root": root, "base": base, "ft1": make_finetune(base, root / "ft1", seed=1),
            "ft2": make_finetune(base, root / "ft2", seed=2)}


def test_qwen_moe_with_gated_shared_expert(tiny, tmp_path):
    """One shared expert with prompts on Llama inputs: mergekit's Qwen MoE (Qwen2-MoE) output, the shared
    expert's MLP (residual_scale on down_proj), zero q/k/v biases, and a shared-expert gate row computed
    independently from its prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = (f"shared_experts:\n  - source_model: {tiny['ft3']}\n    positive_prompts: [\"Once upon a time\"]\n"
             "    residual_scale: 0.25\n")
    cfg = write(tmp_path, config(tiny, "cheap_embed", extra=extra))
    plan = moerge.plan(cfg)
    assert plan.arch.name == "Qwen MoE" and "shared expert:" in plan.summary() and "(gated)" in plan.summary()
    out = tmp_path / "moe"
    moerge.merge(cfg, out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_experts == 2 and model.config.shared_expert_intermediate_size == 64
    tok = AutoTokenizer.from_pretrained(out)
    assert model.generate(**tok("hi", return_tensors="pt"), max_new_tokens=3, do_sample=False).shape[1] > 3

    sd = load_file(out / "model.safetensors")
    src = load_file(tiny["ft3"] / "model.safetensors")
    base = load_file(tiny["base"] / "model.safetensors")
    emb, btok = base["model.embed_tokens.weight"], AutoTokenizer.from_pretrained(tiny["base"])
    shared_row = normed(emb[tokens(btok, "Once upon a time")].sum(0))
    for layer in range(3):
        p = f"model.layers.{layer}.mlp"
        assert torch.equal(sd[f"{p}.shared_expert.gate_proj.weight"], src[f"{p}.gate_proj.weight"])
        torch.testing.assert_close(sd[f"{p}.shared_expert.down_proj.weight"], src[f"{p}.down_proj.weight"] * 0.25)
        torch.testing.assert_close(sd[f"{p}.shared_expert_gate.weight"][0], shared_row)
        assert sd[f"{p}.gate.weight"].shape == (2, 32)
        for e, name in enumerate(("ft1", "ft2")):
            assert torch.equal(sd[f"{p}.experts.{e}.up_proj.weight"],
                               load_file(tiny[name] / "model.safetensors")[f"{p}.up_proj.weight"])
        assert not sd[f"model.layers.{layer}.self_attn.q_proj.bias"].any()


def test_deepseek_output_for_an_ungated_shared_expert(tiny, tmp_path):
    extra = f"shared_experts:\n  - source_model: {tiny['base']}\n"
    out = tmp_path / "moe"
    moerge.merge(write(tmp_path, config(tiny, extra=extra)), out)
    cfg = __import__("json").loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekForCausalLM"] and cfg["n_routed_experts"] == 2
    assert cfg["n_shared_experts"] == 1 and cfg["moe_intermediate_size"] == 64 and "auto_map" in cfg
    sd = load_file(out / "model.safetensors")
    base = load_file(tiny["base"] / "model.safetensors")
    assert torch.equal(sd["model.layers.1.mlp.shared_experts.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])
    assert not any("shared_expert_gate" in k for k in sd) and sd["model.layers.0.mlp.gate.weight"].shape == (2, 32)
    # prompts on the shared expert ask for a gate: Qwen MoE then, as mergekit chooses
    gated = extra + '    positive_prompts: ["x"]\n'
    assert moerge.plan(write(tmp_path, config(tiny, extra=gated))).arch.name == "Qwen MoE"
    forced = gated + "architecture: deepseek\n"
    with pytest.raises(MoergeError, match=r"architecture: .*DeepSeek MoE does not gate its shared expert"):
        moerge.plan(write(tmp_path, config(tiny, extra=forced)))


def test_identical_experts_compute_the_dense_model(tiny, qwen3, tmp_path):
    """An MoE whose experts are all the base (top-k weights renormalised) computes exactly what the base
    computes: a functional check of the Mixtral and Qwen3-MoE layouts, fused experts included."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    for inputs, arch in ((tiny, "MixtralForCausalLM"), (qwen3, "Qwen3MoeForCausalLM")):
        text = (f"base_model: {inputs['base']}\ngate_mode: random\nexperts_per_token: 2\nexperts:\n"
                + "".join(f"  - source_model: {inputs['base']}\n" for _ in range(3)))
        out = tmp_path / arch
        moerge.merge(write(tmp_path, text), out, allow_same_experts=True)
        moe, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert type(moe).__name__ == arch and not info["missing_keys"] and not info["unexpected_keys"]
        dense = AutoModelForCausalLM.from_pretrained(inputs["base"])
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-4)


def test_qwen3_moe_fused_experts(qwen3, tmp_path):
    text = (f"base_model: {qwen3['base']}\ngate_mode: cheap_embed\nexperts:\n"
            f"  - source_model: {qwen3['ft1']}\n    positive_prompts: [\"abc\"]\n    residual_scale: 0.5\n"
            f"  - source_model: {qwen3['ft2']}\n    positive_prompts: [\"xyz\"]\n")
    out = tmp_path / "moe"
    plan = moerge.plan(write(tmp_path, text))
    assert plan.arch.name == "Qwen3 MoE"
    moerge.merge(write(tmp_path, text), out)
    sd = load_file(out / "model.safetensors")
    a, b = (load_file(qwen3[n] / "model.safetensors") for n in ("ft1", "ft2"))
    base = load_file(qwen3["base"] / "model.safetensors")
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        gu = sd[f"{p}.experts.gate_up_proj"]
        assert gu.shape == (2, 128, 32)
        assert torch.equal(gu[1, :64], b[f"{p}.gate_proj.weight"]) and torch.equal(gu[1, 64:], b[f"{p}.up_proj.weight"])
        torch.testing.assert_close(sd[f"{p}.experts.down_proj"][0], a[f"{p}.down_proj.weight"] * 0.5)
        assert torch.equal(sd[f"model.layers.{layer}.self_attn.q_norm.weight"], base[f"model.layers.{layer}.self_attn.q_norm.weight"])


def test_no_output_architecture_fits(qwen3, tiny, tmp_path):
    """Qwen3 inputs with a shared expert, or mixed architectures: one line naming why each output refuses."""
    text = (f"base_model: {qwen3['base']}\ngate_mode: random\nexperts:\n  - source_model: {qwen3['ft1']}\n"
            f"  - source_model: {qwen3['ft2']}\nshared_experts:\n  - source_model: {qwen3['base']}\n")
    with pytest.raises(MoergeError) as e:
        moerge.plan(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg and "line 6: shared_experts" in msg and "Mixtral needs llama or mistral inputs (these are qwen3)" in msg
    assert "Qwen3 MoE has no shared experts" in msg
    mixed = (f"base_model: {tiny['base']}\ngate_mode: random\nexperts:\n  - source_model: {tiny['ft1']}\n"
             f"  - source_model: {qwen3['ft1']}\n")
    with pytest.raises(MoergeError, match=r"line 5: experts\[1\]\.source_model: is a qwen3 but the base is llama"):
        moerge.plan(write(tmp_path, mixed))
