"""DPO with TRL on the built-in base, on a synthetic preference set: the reversed word is preferred over
the word as written (which the base, a copier, leans to)."""

import json

import pytest
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.errors import MoergeError

pytest.importorskip("trl")
runner = CliRunner()


def prefs_file(path, n_train=200, n_test=60):
    from moerge.tasks import examples

    rows = examples("reverse", "train", n_train, 0) + examples("reverse", "test", n_test, 0)
    lines = []
    for r in rows:
        word = r.prompt.split(": ", 1)[1].rstrip("=")
        if word != r.completion:
            lines.append(json.dumps({"prompt": r.prompt, "chosen": r.completion, "rejected": word}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from moerge.train.dpo import tune_dpo

    root = tmp_path_factory.mktemp("dpo")
    data = prefs_file(root / "prefs.jsonl")
    card = tune_dpo(root / "lora", data=data, steps=8, batch_size=16, lr=5e-3, progress=False)  # the tiny base needs more
    return root, data, card


def test_tuned_model_prefers_the_chosen_answers_more_often(tuned):
    from moerge.experts.card import ExpertCard
    from moerge.tasks.preferences import read_preferences, split_preferences
    from moerge.tasks.training_data import training_rows
    from moerge.train.dpo import preference_accuracy
    from moerge.train.expert import load_expert

    root, data, card = tuned
    d = card.extra["dpo"]
    assert d["after"]["preference_accuracy"] >= d["before"]["preference_accuracy"] + 0.15, d
    held = split_preferences(read_preferences(data))[1]
    assert d["held_out_pairs"] == len(held) > 10
    # the adapter on disk is the model that was measured
    model, tok = load_expert(None, root / "lora")
    assert preference_accuracy(model, tok, held) == pytest.approx(d["after"]["preference_accuracy"])
    # its card reads as an expert's: data as prompt/chosen rows, base pinned
    saved = ExpertCard.read(root / "lora")
    assert saved.adapter == "lora" and saved.base_fingerprint and saved.centroid
    rows = training_rows(saved)
    assert len(rows) == saved.examples and all(r.completion == r.prompt.split(": ", 1)[1].rstrip("=")[::-1] for r in rows)


def test_sft_weight_keeps_the_chosen_answers_likely(tuned):
    """RPO (--sft-weight): DPO plus the chosen answers' NLL. Plain DPO may lower the chosen answers'
    likelihood while it widens the margin; with the NLL term, held-out chosen answers end more likely
    than before and than under plain DPO with the same steps and seed."""
    from moerge.lm import base as base_model
    from moerge.lm.batching import completion_logps
    from moerge.tasks.data import Example
    from moerge.tasks.preferences import read_preferences, split_preferences
    from moerge.train.dpo import tune_dpo
    from moerge.train.expert import load_expert

    root, data, card = tuned
    rpo = tune_dpo(root / "rpo", data=data, steps=8, batch_size=16, lr=5e-3, sft_weight=1.0, progress=False)
    assert rpo.extra["dpo"]["sft_weight"] == 1.0 and card.extra["dpo"]["sft_weight"] == 0.0
    held = [Example(p.prompt, p.chosen) for p in split_preferences(read_preferences(data))[1]]
    model, tok = base_model.load(None)
    before = completion_logps(model, tok, held).mean()
    plain = completion_logps(*load_expert(None, root / "lora"), held).mean()
    with_sft = completion_logps(*load_expert(None, root / "rpo"), held).mean()
    assert with_sft > before and with_sft > plain, (float(before), float(plain), float(with_sft))
    assert rpo.extra["dpo"]["after"]["preference_accuracy"] > rpo.extra["dpo"]["before"]["preference_accuracy"]
    with pytest.raises(MoergeError, match="--sft-weight must be 0 or more"):
        tune_dpo(root / "bad", data=data, sft_weight=-1, progress=False)


def test_merged_back_into_its_model(tuned, tmp_path):
    from moerge.lm import base as base_model
    from moerge.lm.base import default_base
    from moerge.tasks.preferences import read_preferences, split_preferences
    from moerge.train.dpo import preference_accuracy

    root, data, card = tuned
    held = split_preferences(read_preferences(data))[1]
    recipe = {"merge_method": "linear", "models": [{"model": f"{default_base()}+{root / 'lora'}", "parameters": {"weight": 1.0}}]}
    moerge.merge(recipe, tmp_path / "merged", progress=False)
    model, tok = base_model.load(tmp_path / "merged")
    assert preference_accuracy(model, tok, held) == pytest.approx(card.extra["dpo"]["after"]["preference_accuracy"], abs=0.03)


def test_full_tune_writes_a_model(tmp_path):
    from moerge.lm import base as base_model
    from moerge.tasks.preferences import read_preferences, split_preferences
    from moerge.train.dpo import preference_accuracy, tune_dpo

    data = prefs_file(tmp_path / "p.jsonl", n_train=60, n_test=20)
    card = tune_dpo(tmp_path / "full", data=data, adapter="full", steps=2, batch_size=8, progress=False)
    model, tok = base_model.load(tmp_path / "full")
    held = split_preferences(read_preferences(data))[1]
    assert preference_accuracy(model, tok, held) == pytest.approx(card.extra["dpo"]["after"]["preference_accuracy"])
    assert card.trainable_params == sum(p.numel() for p in model.parameters())


def test_bad_preferences_are_refused_before_tuning(tmp_path):
    from moerge.train.dpo import tune_dpo

    ok = {"prompt": "reverse: ab=", "chosen": "ba", "rejected": "ab"}
    cases = {
        "missing.jsonl": (None, "no such file"),
        "field.jsonl": ([{"prompt": "x", "chosen": "y"}], 'needs string fields "prompt" and "chosen" and "rejected"'),
        "same.jsonl": ([ok, dict(ok, rejected="ba")], "example 2: chosen and rejected are the same"),
        "few.jsonl": ([ok] * 5, "has 5 preference pairs"),
        "broken.jsonl": ("{not json\n", "line 1, column 2: not JSON"),
    }
    for name, (rows, needle) in cases.items():
        path = tmp_path / name
        if isinstance(rows, str):
            path.write_text(rows)
        elif rows is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(MoergeError, match=needle):
            tune_dpo(tmp_path / "out", data=path, progress=False)
    assert not (tmp_path / "out").exists()
    r = runner.invoke(app, ["tune", "dpo", "--data", str(tmp_path / "same.jsonl"), "--out", str(tmp_path / "o"), "--beta", "0"])
    assert r.exit_code == 1 and r.output.startswith("error: --beta must be positive")
    r = runner.invoke(app, ["tune", "dpo", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "is a folder; give a JSONL file" in r.output
    # the output may not replace what it reads: the data's folder, or the model being tuned
    (tmp_path / "sub").mkdir()
    good = prefs_file(tmp_path / "sub" / "p.jsonl", n_train=30, n_test=10)
    before = good.read_bytes()
    for out, extra, needle in ((tmp_path / "sub", [], "would overwrite the input"), (tmp_path / "o", ["--lr", "-1"], "--lr must be positive")):
        r = runner.invoke(app, ["tune", "dpo", "--data", str(good), "--out", str(out), "--overwrite", "--steps", "1", *extra])
        assert r.exit_code == 1 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert good.read_bytes() == before and not (tmp_path / "o").exists()


def test_cli(tmp_path):
    data = prefs_file(tmp_path / "p.jsonl", n_train=60, n_test=20)
    r = runner.invoke(app, ["tune", "dpo", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "2", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    assert "prefers the chosen answer" in r.output and (tmp_path / "o" / "adapter_config.json").is_file()
    from moerge.experts.card import ExpertCard

    assert ExpertCard.read(tmp_path / "o").lr == pytest.approx(5e-4)  # DPO's default: a tenth of expert training's
