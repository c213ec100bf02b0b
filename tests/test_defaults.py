"""Defaults that follow the data: a command given less than everything takes the rest from the
expert's card, the task files, or the library, and says what it used (issue 28)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from moerge.api import evaluate, merge
from moerge.cli import app
from moerge.errors import MoergeError
from moerge.experts.card import recorded_base
from moerge.lm import base as base_model

runner = CliRunner()


def test_the_base_an_expert_was_made_on_comes_from_its_card(expert, other_base, tmp_path):
    default = base_model.default_base()
    assert recorded_base(expert).resolve() == default.resolve()
    moved = tmp_path / "moved"
    shutil.copytree(expert, moved)
    card = json.loads((moved / "expert.json").read_text())
    # the base folder is gone (another machine, a moved cache): found again by its fingerprint
    (moved / "expert.json").write_text(json.dumps(card | {"base": str(tmp_path / "gone")}))
    assert recorded_base(moved) == default
    # a base that is nowhere here: one line saying so, not a silent fall back to the built-in base
    (moved / "expert.json").write_text(json.dumps(card | {"base": str(tmp_path / "gone"), "base_fingerprint": "sha256:0"}))
    with pytest.raises(MoergeError, match="its card says it was made on .*gone, which is not here"):
        recorded_base(moved)
    # no card: PEFT's base_model_name_or_path when it is a folder here; a hub id says nothing here
    (moved / "expert.json").unlink()
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": str(other_base)}))
    assert recorded_base(moved) == other_base
    (moved / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "org/model"}))
    assert recorded_base(moved) is None


def test_eval_of_an_adapter_runs_on_the_base_its_card_names(other_base, tmp_path):
    from moerge.train.expert import train_expert

    train_expert(tmp_path / "x", base=other_base, task="sort", steps=2, n_train=32, batch_size=8, progress=False)
    res = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "x"), "--tasks", "sort", "--n", "4",
                              "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["model"] == str(other_base.resolve()) and set(saved["scores"]) == {"sort"}
    # the same expert on the built-in base is refused by the base check, naming the base it was made for
    res = runner.invoke(app, ["eval", str(base_model.default_base()), "--adapter", str(tmp_path / "x"), "--tasks", "sort"])
    assert res.exit_code == 1 and "was made for another base" in res.output and str(other_base) in res.output


def test_expert_combine_takes_the_base_from_the_card(expert, tmp_path):
    res = runner.invoke(app, ["expert", "combine", str(expert), str(expert), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "c" / "expert.json").read_text())
    assert card["base_fingerprint"] == json.loads((expert / "expert.json").read_text())["base_fingerprint"]
    plain = tmp_path / "plain"
    shutil.copytree(expert, plain)
    (plain / "expert.json").unlink()
    cfg = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "org/model"}))
    res = runner.invoke(app, ["expert", "combine", str(plain), "--out", str(tmp_path / "d")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "give it with --base" in lines[0] and not (tmp_path / "d").exists()


def test_expert_show_summarises_and_json_gives_everything(expert):
    res = runner.invoke(app, ["expert", "show", str(expert)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) < 50 and any("centroids" in ln and "dims>" in ln for ln in lines) and "--json" in lines[-1]
    res = runner.invoke(app, ["expert", "show", str(expert), "--json"])
    full = json.loads(res.output)
    assert len(full["centroid"]) == json.loads((base_model.default_base() / "config.json").read_text())["hidden_size"]
    assert runner.invoke(app, ["expert", "show", str(expert / "nope")]).exit_code == 1


def test_merge_report_counts_the_prompts_it_scored_and_computes_as_eval_does(bf16_base, tmp_path, monkeypatch):
    from moerge.lm import precision
    from moerge.tasks import examples

    rows = [{"prompt": f"echo {i}:", "completion": f" {i}"} for i in range(60)]
    data = tmp_path / "echo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    k = len(examples(str(data), "test", 100))
    assert 0 < k < 100
    monkeypatch.setenv(precision.ENV, "bfloat16")
    recipe = {"merge_method": "linear", "models": [{"model": str(bf16_base), "parameters": {"weight": 1.0}}]}
    res = merge(recipe, tmp_path / "out", eval_tasks=f"copy,{data}", eval_n=100)
    assert res.report.prompts == {"copy": 100, str(data): k} and res.report.dtype == "bfloat16"
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"copy 100, {data} {k}" in card and "computed in bfloat16" in card
    # the input's row is what `moerge eval` prints for it: the same dtype, the same prompts
    alone = evaluate(bf16_base, tasks=f"copy,{data}", n=100)
    assert res.report.inputs[0]["scores"] == alone.scores and alone.prompts == res.report.prompts


def test_a_recipe_names_the_librarys_base_as_library_base(expert, tmp_path):
    from moerge.api import plan
    from moerge.library import Library

    lib = Library.init(tmp_path / "lib", base_model.default_base())
    lib.add(expert, "sort")
    recipe = {"merge_method": "task_arithmetic", "base_model": "library://base",
              "models": [{"model": "library://sort", "parameters": {"weight": 1.0}}]}
    p = plan(recipe, library=lib.root)
    assert sorted(m.pinned for m in p.models) == ["library://base@1", "library://sort@1"]
    assert next(m for m in p.models if m.pinned == "library://base@1").folder == lib.base().path
    with pytest.raises(MoergeError, match=r"no expert 'nosuch'.*library://base"):
        plan(recipe | {"models": [{"model": "library://nosuch"}]}, library=lib.root)
    with pytest.raises(MoergeError, match="reserved for the library's base"):
        lib.add(expert, "base")


def test_routing_and_serving_use_the_library_in_the_environment(expert, tmp_path, monkeypatch):
    from moerge.library import Library
    from moerge.routing.model import gather_experts
    from moerge.serve.bank import sources

    lib = Library.init(tmp_path / "lib", base_model.default_base())
    lib.add(expert, "sort")
    monkeypatch.setenv("MOERGE_LIBRARY", str(lib.root))
    loaded, cards, base_dir = gather_experts()
    assert [c["name"] for c in cards] == ["sort@1"] and base_dir == lib.base().path
    assert sources()[3] == "base@1"
    assert len(loaded) == 1 and loaded[0].kind == "lora"
    monkeypatch.delenv("MOERGE_LIBRARY")
    with pytest.raises(MoergeError, match=r"or a library \(--library, or set \$MOERGE_LIBRARY"):
        gather_experts()


def test_the_tour_s_defaults_and_refusals(expert, tmp_path, monkeypatch):
    """Found by trying the README's tour: a library of the built-in base by default; serve takes
    $MOERGE_LIBRARY's experts; a JSONL task with no test rows and `base` in any case are refused before
    anything is written; a recipe's library:// with no library says where to point it."""
    from moerge.library import Library
    from moerge.serve.bank import open_bank

    res = runner.invoke(app, ["library", "init", str(tmp_path / "lib")])
    assert res.exit_code == 0, res.output
    lib = Library.open(tmp_path / "lib")
    assert lib.base().path == base_model.default_base().resolve()
    lib.add(expert, "sort")
    with pytest.raises(MoergeError, match="reserved"):
        lib.add(expert, "BASE")
    monkeypatch.setenv("MOERGE_LIBRARY", str(lib.root))
    bank = open_bank(routers=["centroid"])
    assert bank.names == ["sort@1"] and "centroid" in bank.routers
    monkeypatch.delenv("MOERGE_LIBRARY")
    few = tmp_path / "few.jsonl"
    from moerge.tasks import split_of

    prompts = [p for p in (f"p{i}" for i in range(100)) if split_of(p) != "test"][:20]  # rows, none of them test
    few.write_text("".join(json.dumps({"prompt": p, "completion": "c"}) + "\n" for p in prompts))
    recipe = {"merge_method": "linear", "models": [{"model": str(base_model.default_base()), "parameters": {"weight": 1.0}}]}
    with pytest.raises(MoergeError, match="test split"):
        merge(recipe, tmp_path / "out", eval_tasks=f"copy,{few}", eval_n=20)
    assert not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoergeError, match=r"library://sort: .*not an expert library.*--library DIR \(or \$MOERGE_LIBRARY\)"):
        merge({"merge_method": "linear", "models": [{"model": "library://sort"}]}, tmp_path / "out2")
