"""Multi-document recipes (mergekit-multi's form): stages in dependency order, one final output."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.engine.multi import MultiPlan, MultiRecipe
from moerge.engine.recipe import Recipe
from moerge.errors import MoergeError

runner = CliRunner()


def sd(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same(a, b):
    a, b = sd(a), sd(b)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def ties(tiny, a="ft1", b="ft2"):
    return (f"merge_method: ties\nbase_model: {tiny['base']}\nmodels:\n"
            f"  - model: {tiny[a]}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
            f"  - model: {tiny[b]}\n    parameters: {{weight: 0.4, density: 0.7}}\n")


def linear(x, y, w=0.5):
    return f"merge_method: linear\nmodels:\n  - model: {x}\n    parameters: {{weight: {w}}}\n  - model: {y}\n    parameters: {{weight: {1 - w}}}\n"


def leftovers(folder):
    """Anything a run may have left beside OUT: partial folders, stage folders."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_two_stages_equal_running_them_by_hand(tiny, tmp_path):
    text = "name: soup\n" + ties(tiny) + "---\n" + linear("soup", tiny["ft3"], 0.7)
    (tmp_path / "multi.yaml").write_text(text)
    res = moerge.merge(tmp_path / "multi.yaml", tmp_path / "out")
    assert res.out_dir == tmp_path / "out"
    by_hand = moerge.merge(ties(tiny), tmp_path / "h1")
    moerge.merge(linear(by_hand.out_dir, tiny["ft3"], 0.7), tmp_path / "h2")
    same(tmp_path / "out", tmp_path / "h2")
    assert leftovers(tmp_path) == []  # the temporary stage folder is gone
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_three_stages_in_dependency_order_not_file_order(tiny, tmp_path):
    """As in mergekit, a document may use a stage defined after it; every reference site works
    (models, base_model, slices sources, tokenizer_source)."""
    text = (
        # the final stage first: slices over the slerp stage and ft3, tokenizer from 'ta'
        "merge_method: linear\ntokenizer_source: ta\nparameters: {weight: 0.5}\nslices:\n"
        "  - sources:\n      - {model: sl, layer_range: [0, 3]}\n"
        f"      - {{model: {tiny['ft3']}, layer_range: [0, 3]}}\n"
        "---\nname: sl\nmerge_method: slerp\nbase_model: ta\nmodels:\n"
        f"  - model: {tiny['ft2']}\nparameters: {{t: 0.3}}\n"
        "---\nname: ta\nmerge_method: task_arithmetic\n"
        f"base_model: {tiny['base']}\nmodels:\n  - model: {tiny['ft1']}\n    parameters: {{weight: 0.8}}\n"
    )
    multi = moerge.load_recipe(text)
    assert isinstance(multi, MultiRecipe)
    assert [s.name for s in multi.stages] == ["ta", "sl", None]
    assert multi.stages[1].uses == ["ta"] and multi.final.uses == ["sl", "ta"]
    moerge.merge(text, tmp_path / "out")

    h1 = moerge.merge({"merge_method": "task_arithmetic", "base_model": str(tiny["base"]),
                       "models": [{"model": str(tiny["ft1"]), "parameters": {"weight": 0.8}}]}, tmp_path / "h1").out_dir
    h2 = moerge.merge({"merge_method": "slerp", "base_model": str(h1), "models": [{"model": str(tiny["ft2"])}],
                       "parameters": {"t": 0.3}}, tmp_path / "h2").out_dir
    moerge.merge({"merge_method": "linear", "tokenizer_source": str(h1), "parameters": {"weight": 0.5},
                  "slices": [{"sources": [{"model": str(h2), "layer_range": [0, 3]},
                                          {"model": str(tiny["ft3"]), "layer_range": [0, 3]}]}]}, tmp_path / "h3")
    same(tmp_path / "out", tmp_path / "h3")
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_plan_returns_every_stage_planned_before_anything_runs(tiny, tmp_path):
    text = "name: a\n" + ties(tiny) + "---\nname: b\n" + linear("a", tiny["ft3"]) + "---\n" + linear("b", "a", 0.25)
    plan = moerge.plan(text)
    assert isinstance(plan, MultiPlan) and len(plan) == 3
    assert [sp.stage.name for sp in plan] == ["a", "b", None]
    assert all(sp.plan is not None for sp in plan) and [sp.expected for sp in plan] == [False, True, True]
    assert [m.ref for m in plan.final.plan.models] == ["b", "a"]
    summary = plan.summary()
    assert summary.startswith("stages: a -> b -> (unnamed final stage)")
    assert "[2/3] stage 'b' (line 10), uses a: planned on the expected output of a" in summary
    assert "method: ties" in summary and "method: linear" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, message", [
    ("name: a\n{ties}---\nname: b\n{lin_ab}---\n{lin_bx}".replace("{lin_bx}", linear("bb", "./x")),
     r"^<recipe>: line 20: the unnamed final stage: models\[0\]\.model: 'bb' is neither a stage of this file "
     r"\(stages: a, b\) nor a model \(bb: no such file or folder\); did you mean stage 'b'\?$"),
    ("name: a\n{ties}---\nname: b\n{lin_ab}---\nname: a\n{lin_bx}",
     r"^<recipe>: line 18: name: 'a' is also the name of the stage at line 1; give each stage its own name$"),
    ("name: a\n" + linear("b", "c") + "---\nname: b\n" + linear("c", "./x") + "---\nname: c\n" + linear("a", "./x")
     + "---\n" + linear("c", "./x"),
     r"^<recipe>: line 4: stage 'a': models\[0\]\.model: the stages form a cycle \(a uses b, b uses c, c uses a\); "),
    ("name: a\n" + linear("a", "./x") + "---\n" + linear("a", "./x"),
     r"^<recipe>: line 4: stage 'a': models\[0\]\.model: uses its own output; a stage cannot be its own input$"),
    ("{ties}---\n" + linear("./x", "./y"),
     r"^<recipe>: line 9: this document has no name:, and neither has the one at line 1; only the final stage may go "
     r"unnamed \(as in mergekit\): name the others$"),
    ("name: a\n{ties}---\nname: b\n{ties}",
     r"^<recipe>: line 10: stages 'a' \(line 1\) and 'b' \(line 10\) are both final: no stage uses them"),
    ("name: a\n{ties}---\nname: b\n{ties}---\n{lin_ab}".replace("{lin_ab}", linear("a", "{ft3}")),
     r"^<recipe>: line 10: stage 'b': no stage uses it and it is not the final output \(the unnamed final stage, line 19\), "
     r"so its merge would be thrown away; remove it, use it, or pass --keep-intermediates DIR to keep it$"),
    ("name: a\n{ties}---\n" + linear("a@v2", "{ft3}"),
     r"^<recipe>: line 12: the unnamed final stage: models\[0\]\.model: 'a@v2': stage 'a' is merged here and has no "
     r"revisions; write a$"),
    ("name: a\n{ties}---\nname: b\n" + linear("a", "{ft3}").replace("weight: 0.5", "weight: 0.5, densty: 1", 1)
     + "---\n" + linear("b", "a"),
     r"^<recipe>: line 14: stage 'b': models\[0\]\.parameters\.densty: unknown parameter; did you mean 'density'\?"),
    ("name: a/x\n{ties}---\n" + linear("a/x", "{ft3}"),
     r"^<recipe>: line 1: name: 'a/x' cannot name a stage"),
    # planned on stage a's expected output: a 2-layer model where the final stage wants 3 layers
    ("name: a\nmerge_method: passthrough\nslices:\n  - sources: [{model: {ft1}, layer_range: [0, 2]}]\n---\n"
     "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 3]}]\n",
     r"^<recipe>: line 6: the unnamed final stage: slices\[0\]: layer_range \[0, 3\] exceeds the 2 layers of a$"),
    ("name: a\nmerge_method: passthrough\nslices:\n  - sources: [{model: {ft1}, layer_range: [0, 2]}]\n---\n"
     + linear("{ft3}", "a"),
     r"^<recipe>: line 6: the unnamed final stage: a: lacks tensor 'model\.layers\.2\.[a-z_.]+' that the other inputs have"),
])
def test_bad_chains_are_refused_in_one_line_before_any_stage_runs(tiny, tmp_path, text, message):
    text = (text.replace("{ties}", ties(tiny)).replace("{lin_ab}", linear("a", tiny["ft3"]))
            .replace("{lin_bx}", linear("b", tiny["ft3"])).replace("{ft1}", str(tiny["ft1"]))
            .replace("{ft3}", str(tiny["ft3"])))
    out = tmp_path / "out"
    with pytest.raises(MoergeError, match=message) as e:
        moerge.merge(text, out)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written: no OUT, no stage folder, no partial


def test_keep_intermediates_keeps_each_stage_and_its_card(tiny, tmp_path):
    text = "name: a\n" + ties(tiny) + "---\nname: b\n" + linear("a", tiny["ft3"]) + "---\nname: c\n" + linear("b", "a", 0.25)
    keep = tmp_path / "stages"
    moerge.merge(text, tmp_path / "out", keep_intermediates=keep)
    assert sorted(p.name for p in keep.iterdir()) == ["a", "b"]
    same(keep / "a", moerge.merge(ties(tiny), tmp_path / "h1").out_dir)
    same(keep / "b", moerge.merge(linear(keep / "a", tiny["ft3"]), tmp_path / "h2").out_dir)
    same(tmp_path / "out", moerge.merge(linear(keep / "b", keep / "a", 0.25), tmp_path / "h3").out_dir)
    # an intermediate's own card and recipe record the stages it needs
    kept = moerge.load_recipe(keep / "b" / "moerge_recipe.yaml")
    assert [s.name for s in kept.stages] == ["a", "b"]
    # again without --overwrite: the kept stage folders are refused before anything runs
    with pytest.raises(MoergeError, match=r"stages/a: already exists \(--keep-intermediates keeps stage 'a' there\)"):
        moerge.merge(text, tmp_path / "out2", keep_intermediates=keep)
    assert not (tmp_path / "out2").exists()
    # a named stage no stage uses runs when intermediates are kept (as mergekit writes every named merge)
    extra = "name: a\n" + ties(tiny) + "---\nname: lone\n" + linear(tiny["ft1"], tiny["ft2"]) + "---\n" + linear("a", tiny["ft3"])
    moerge.merge(extra, tmp_path / "out3", keep_intermediates=tmp_path / "k3")
    assert sorted(p.name for p in (tmp_path / "k3").iterdir()) == ["a", "lone"]
    assert [s.name for s in moerge.load_recipe(tmp_path / "out3" / "moerge_recipe.yaml").stages] == ["a", None]


def test_saved_recipe_and_card_record_the_chain_and_reproduce_it(tiny, tmp_path):
    text = ("name: soup\n" + ties(tiny) + "---\nname: final\nmerge_method: dare_ties\n"
            f"base_model: {tiny['base']}\nmodels:\n  - model: soup\n    parameters: {{weight: 0.5, density: 0.6}}\n"
            f"  - model: {tiny['ft3']}\n    parameters: {{weight: 0.5, density: 0.6}}\n")
    moerge.merge(text, tmp_path / "out", seed=7)
    saved = (tmp_path / "out" / "moerge_recipe.yaml").read_text()
    docs = list(yaml.safe_load_all(saved))
    assert [d["name"] for d in docs] == ["soup", "final"] and saved.startswith("name: soup\n")
    assert docs[1]["seed"] == 7 and docs[1]["models"][0]["model"] == "soup"
    again = moerge.merge(tmp_path / "out" / "moerge_recipe.yaml", tmp_path / "again")
    same(tmp_path / "out", again.out_dir)
    assert (again.out_dir / "moerge_recipe.yaml").read_text() == saved
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == [str(tiny[k]) for k in ("base", "ft1", "ft2", "ft3")]  # the chain's inputs, no stage
    assert "ties" in front["tags"] and "dare_ties" in front["tags"]
    assert "# final" in card and "in 2 stages" in card and "| 1 | `soup` | TIES |" in card
    assert "## Intermediate outputs" in card and "| `soup` | `sha256:" in card
    assert saved in card  # the whole chain, as saved


def test_list_of_recipes_and_single_documents_are_unchanged(tiny, tmp_path):
    stages = [yaml.safe_load("name: a\n" + ties(tiny)), yaml.safe_load(linear("a", tiny["ft3"]))]
    res = moerge.merge(stages, tmp_path / "out")
    same(res.out_dir, moerge.merge("name: a\n" + ties(tiny) + "---\n" + linear("a", tiny["ft3"]), tmp_path / "o2").out_dir)
    # one document, with or without --- markers, is a plain recipe (and its card is the single one)
    for text in ("---\n" + ties(tiny), ties(tiny) + "---\n", "name: x\n" + ties(tiny)):
        assert isinstance(moerge.load_recipe(text), Recipe)
    with pytest.raises(MoergeError, match="keep-intermediates: the recipe has one stage"):
        moerge.merge(ties(tiny), tmp_path / "o3", keep_intermediates=tmp_path / "k")
    assert not (tmp_path / "o3").exists()


def test_adapter_on_a_stage_output(tiny, tmp_path):
    """``NAME+adapter`` applies an adapter to a stage's output; that stage is planned once it exists."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "org/any"}))
    text = "name: a\n" + ties(tiny) + "---\n" + linear(f"a+{tmp_path / 'lora'}", tiny["ft3"])
    plan = moerge.plan(text)
    assert plan.final.plan is None and plan.final.waits_for == "a" and plan.final.adapter
    assert "planned once a has run (an adapter is applied to its output)" in plan.summary()
    moerge.merge(text, tmp_path / "out", keep_intermediates=tmp_path / "k")
    same(tmp_path / "out", moerge.merge(linear(f"{tmp_path / 'k' / 'a'}+{tmp_path / 'lora'}", tiny["ft3"]), tmp_path / "h").out_dir)
    saved = list(yaml.safe_load_all((tmp_path / "out" / "moerge_recipe.yaml").read_text()))
    assert saved[1]["models"][0]["model"] == f"a+{tmp_path / 'lora'}"


def test_cli_multi_dry_run_merge_and_errors(tiny, tmp_path):
    recipe = tmp_path / "multi.yaml"
    recipe.write_text("name: a\n" + ties(tiny) + "---\n" + linear("a", tiny["ft3"]))
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "stages: a -> (unnamed final stage)" in res.output and "output tensors:" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--keep-intermediates", str(tmp_path / "k")])
    assert res.exit_code == 0, res.output
    assert "(2 stages)" in res.output and (tmp_path / "k" / "a" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "multi.yaml", "out"]
    res = runner.invoke(app, ["merge", str(tmp_path / "out" / "moerge_recipe.yaml"), str(tmp_path / "again"), "-q"])
    assert res.exit_code == 0, res.output
    same(tmp_path / "out", tmp_path / "again")
    # errors: one line, exit 1, nothing written
    recipe.write_text("name: a\n" + ties(tiny) + "---\n" + linear("b", tiny["ft3"]))
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "o2")])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {recipe}: line 12: the unnamed final stage")
    assert not (tmp_path / "o2").exists()
    single = tmp_path / "single.yaml"
    single.write_text(ties(tiny))
    res = runner.invoke(app, ["merge", str(single), str(tmp_path / "o3"), "--keep-intermediates", str(tmp_path / "k3")])
    assert res.exit_code == 1 and "--keep-intermediates: the recipe has one stage" in res.output
    assert not (tmp_path / "o3").exists() and not (tmp_path / "k3").exists()


def test_lazy_reuses_kept_stages_whose_recipe_matches(tiny, tmp_path, monkeypatch):
    """--lazy (mergekit-multi's): a kept intermediate whose saved recipe is the stage's is not merged again;
    one of another recipe is refused (or, with --overwrite, merged again)."""
    from moerge.engine import multi

    text = "name: a\n" + ties(tiny) + "---\nname: b\n" + linear("a", tiny["ft3"]) + "---\n" + linear("b", "a", 0.25)
    keep = tmp_path / "stages"
    moerge.merge(text, tmp_path / "out", keep_intermediates=keep)
    a_bytes = (keep / "a" / "model.safetensors").read_bytes()
    ran = []
    real = multi.execute  # what runs each stage
    monkeypatch.setattr(multi, "execute", lambda plan, dest, **kw: ran.append(dest.name) or real(plan, dest, **kw))
    moerge.merge(text, tmp_path / "out2", keep_intermediates=keep, lazy=True)
    assert ran == ["out2"]  # only the final stage ran
    same(tmp_path / "out", tmp_path / "out2")
    assert (keep / "a" / "model.safetensors").read_bytes() == a_bytes
    # a changed stage: its kept output is another merge
    changed = text.replace("density: 0.5", "density: 0.6")
    with pytest.raises(MoergeError, match=r"stages/a: holds another merge .* --lazy cannot reuse it for stage 'a'"):
        moerge.merge(changed, tmp_path / "out3", keep_intermediates=keep, lazy=True)
    assert not (tmp_path / "out3").exists()
    ran.clear()
    moerge.merge(changed, tmp_path / "out3", keep_intermediates=keep, lazy=True, overwrite=True)
    assert ran == ["a", "b", "out3"]  # b's saved recipe records a's parameters, so b runs again too
    with pytest.raises(MoergeError, match="--lazy .* needs --keep-intermediates DIR"):
        moerge.merge(text, tmp_path / "out4", lazy=True)
    (tmp_path / "one.yaml").write_text(ties(tiny))
    r = runner.invoke(app, ["merge", str(tmp_path / "one.yaml"), str(tmp_path / "out5"), "--lazy"])
    assert r.exit_code == 1 and "one stage" in r.output and "drop --lazy" in r.output


def test_lazy_refuses_a_kept_stage_whose_input_changed_on_disk(tiny, tmp_path):
    import shutil

    from moerge.lm.tiny import make_finetune

    mine = tmp_path / "mine"
    shutil.copytree(tiny["ft1"], mine)
    text = "name: a\n" + linear(mine, tiny["ft2"]) + "---\n" + linear("a", tiny["ft3"])
    keep = tmp_path / "k"
    moerge.merge(text, tmp_path / "out", keep_intermediates=keep)
    shutil.rmtree(mine)
    make_finetune(tiny["base"], mine, seed=42)  # same path, other weights
    with pytest.raises(MoergeError, match=r"k/a: was merged from another .*mine \(its fingerprint is now sha256:"):
        moerge.merge(text, tmp_path / "out2", keep_intermediates=keep, lazy=True)
    (keep / "a" / "model.safetensors").write_bytes(b"garbage")
    moerge.merge(text, tmp_path / "out3", keep_intermediates=keep, lazy=True, overwrite=True)  # merged again
    same(keep / "a", moerge.merge(linear(mine, tiny["ft2"]), tmp_path / "h").out_dir)


def test_dry_run_checks_out_and_kept_folders_as_the_run_would(tiny, tmp_path):
    text = "name: a\n" + ties(tiny) + "---\n" + linear("a", tiny["ft3"])
    (tmp_path / "m.yaml").write_text(text)
    keep = tmp_path / "k"
    moerge.merge(text, tmp_path / "out", keep_intermediates=keep)
    r = runner.invoke(app, ["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out2"), "--keep-intermediates", str(keep),
                            "--dry-run"])
    assert r.exit_code == 1 and "k/a: already exists" in r.output and "--lazy" in r.output
    r = runner.invoke(app, ["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--dry-run"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, ["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out2"), "--keep-intermediates", str(keep),
                            "--lazy", "--dry-run"])
    assert r.exit_code == 0 and "--lazy: kept output(s) a" in r.output
    assert not (tmp_path / "out2").exists()
