"""The built-in base, expert training with PEFT, the expert card, and evaluation."""

import json

import pytest
from typer.testing import CliRunner

from moerge.cli import app
from moerge.errors import MoergeError
from moerge.eval import evaluate
from moerge.experts.card import ExpertCard
from moerge.io.fingerprint import folder_fingerprint
from moerge.lm import base as base_model
from moerge.tasks import examples, write_jsonl
from moerge.train.expert import load_expert, train_expert

runner = CliRunner()


def test_packaged_base_reads_instructions_but_lacks_the_expert_skills():
    folder = base_model.default_base()
    card = json.loads((folder / base_model.CARD).read_text())
    assert card["fingerprint"] == folder_fingerprint(folder)
    model, tok = base_model.load(folder)
    scores = evaluate(model, tok, ["double", "firsthalf", "reverse", "sort", "uppercase"], n=50)
    assert scores["double"] > 0.8 and scores["firsthalf"] > 0.8
    assert scores["reverse"] < 0.2 and scores["sort"] < 0.2 and scores["uppercase"] < 0.2


def test_build_base_is_atomic_and_loads_offline(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.train.pretrain import build_base

    out = build_base(tmp_path / "b", steps=3, progress=False)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == base_model.CONFIG["layers"]
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("aB: 7=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "aB: 7=" and tok.unk_token_id not in ids
    card = json.loads((out / base_model.CARD).read_text())
    assert card["steps"] == 3 and set(card["validation_accuracy"]) >= {"copy", "reverse"}
    with pytest.raises(MoergeError, match="already exists"):
        build_base(out, steps=1, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize("adapter", ["lora", "dora", "ia3", "full"])
def test_every_adapter_kind_trains_saves_and_reloads(adapter, tmp_path):
    card = train_expert(tmp_path / "e", task="reverse", adapter=adapter, steps=3, n_train=64, batch_size=16, progress=False)
    again = ExpertCard.read(tmp_path / "e")
    assert again == card and card.adapter == adapter and card.steps == 3 and card.examples == 64
    assert card.base_fingerprint == folder_fingerprint(base_model.default_base())
    assert card.trainable_params > 0 and card.adapter_bytes > 0 and card.data_sha256.startswith("sha256:")
    model, tok = load_expert(None, tmp_path / "e")
    assert 0 <= evaluate(model, tok, ["reverse"], n=10)["reverse"] <= 1
    if adapter != "full":
        from peft import PeftModel

        base, _ = base_model.load()
        assert isinstance(PeftModel.from_pretrained(base, tmp_path / "e"), PeftModel)
        assert card.trainable_params < 0.2 * sum(p.numel() for p in base.parameters())


def test_training_learns_a_skill(tmp_path):
    card = train_expert(tmp_path / "e", task="novowels", steps=60, progress=False)
    assert card.validation_accuracy >= 0.3 and card.final_loss < 0.5


def test_expert_for_another_base_is_refused(tmp_path, tiny):
    train_expert(tmp_path / "e", task="sort", steps=1, n_train=16, batch_size=8, progress=False)
    with pytest.raises(MoergeError, match="another base"):  # other shapes; same shapes: test_hardening.py
        load_expert(tiny["base"], tmp_path / "e")


def test_user_jsonl_data_and_errors(tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", examples("sort", "train", 100))
    card = train_expert(tmp_path / "e", data=data, steps=2, batch_size=8, progress=False)
    assert card.task == "mine" and card.data == str(data) and 0 < card.examples < 100
    with pytest.raises(MoergeError, match="already exists"):
        train_expert(tmp_path / "e", data=data, steps=1, progress=False)
    with pytest.raises(MoergeError, match="exactly one of"):
        train_expert(tmp_path / "f", steps=1, progress=False)
    with pytest.raises(MoergeError, match="unknown adapter"):
        train_expert(tmp_path / "f", task="sort", adapter="prefix", steps=1, progress=False)
    assert not (tmp_path / "f").exists()


def test_cli_expert_eval_and_tasks(tmp_path):
    res = runner.invoke(app, ["expert", "train", "--task", "nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "unknown task 'nope'" in res.output
    res = runner.invoke(app, ["expert", "train", "--task", "reverse", "--steps", "2", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["expert", "show", str(tmp_path / "e")]).exit_code == 0
    res = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "e"), "--tasks", "reverse,sort", "--n", "10",
                              "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "s.json").read_text())["scores"]) == {"reverse", "sort"}
    res = runner.invoke(app, ["tasks", "export", "add", str(tmp_path / "add.jsonl"), "--n", "7", "--split", "test"])
    assert res.exit_code == 0 and len((tmp_path / "add.jsonl").read_text().splitlines()) == 7
    assert runner.invoke(app, ["tasks", "list"]).exit_code == 0
    res = runner.invoke(app, ["eval", str(tmp_path / "nothing"), "--tasks", "sort"])
    assert res.exit_code == 1 and "no such folder" in res.output


def test_a_trained_expert_merged_alone_is_the_expert(tmp_path):
    """The demo's merges enter experts as base+adapter; one expert through the engine must give the
    same model as PEFT applying it."""
    import torch

    import moerge

    train_expert(tmp_path / "e", task="reverse", steps=5, n_train=64, batch_size=16, progress=False)
    base_dir = base_model.default_base()
    res = moerge.merge({"merge_method": "task_arithmetic", "base_model": str(base_dir),
                        "models": [{"model": f"{base_dir}+{tmp_path / 'e'}", "parameters": {"weight": 1.0}}]},
                       tmp_path / "m", progress=False)
    merged, tok = base_model.load(res.out_dir)
    expert, _ = load_expert(None, tmp_path / "e")
    ids = tok(["reverse: abc="], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expert(ids).logits, rtol=1e-4, atol=1e-4)


def test_completion_loss_equals_the_full_forward_loss():
    """The head run over the completion positions only gives the loss of the whole forward, with and
    without PEFT around the model, for rows whose prompts differ in length; its gradient too."""
    import torch
    from peft import get_peft_model

    from moerge.lm.batching import collate, completion_loss, encode
    from moerge.train.expert import peft_config

    model, tok = base_model.load(base_model.default_base())
    rows = examples("reverse", "train", 6, 0) + examples("sort", "train", 3, 1)
    batch = collate(encode(tok, rows), tok.pad_token_id)
    assert len({int((r != -100).int().argmax()) for r in batch["labels"]}) > 1  # labels start in different columns
    for m in (model, get_peft_model(model, peft_config("lora", 4))):
        full = m(**batch).loss
        fast = completion_loss(m, batch)
        assert torch.allclose(fast, full, atol=1e-5), (fast, full)
        params = [p for p in m.parameters() if p.requires_grad][:3]
        g_full = torch.autograd.grad(full, params)
        g_fast = torch.autograd.grad(completion_loss(m, batch), params)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_full, g_fast))
