"""Merge search (moerge search): candidates merged in memory, scored on validation, compared on test."""

import json

import pytest
import yaml
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.errors import MoergeError
from moerge.lm.base import default_base
from moerge.methods import registry
from moerge.search import score_recipe, search
from moerge.search.space import knobs

runner = CliRunner()


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    from moerge.train.expert import train_expert

    path = tmp_path_factory.mktemp("search") / "novowels"
    train_expert(path, task="novowels", steps=60, batch_size=32, progress=False)
    return path


def _recipe(expert, weight=0.1):
    base = default_base()
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": f"{base}+{expert}", "parameters": {"weight": weight}}], "dtype": "float32"}


def test_a_merge_in_memory_scores_as_the_written_merge(expert, tmp_path):
    from moerge.eval import evaluate
    from moerge.lm import base as base_model

    got = score_recipe(_recipe(expert, 0.8), ["novowels", "copy"], n=20, split="test")
    moerge.merge(_recipe(expert, 0.8), tmp_path / "m")
    model, tok = base_model.load(tmp_path / "m")
    assert got["scores"] == evaluate(model, tok, ["novowels", "copy"], n=20)


def test_search_finds_a_better_weight_than_a_bad_default(expert, tmp_path):
    res = search(_recipe(expert, 0.05), tasks="novowels", budget=8, n=30, seed=0)
    assert res.history[0]["values"] == {"models[0].weight": 0.05}  # the recipe as written is tried first
    assert res.default_score == res.history[0]["score"]
    assert res.best_score == max(h["score"] for h in res.history) > res.default_score + 0.2
    assert res.best["models"][0]["parameters"]["weight"] > 0.3
    assert sum(res.best_test.values()) > sum(res.default_test.values())  # it holds on the test split too
    assert len({json.dumps(h["values"]) for h in res.history}) > 3  # it tried different weights
    assert res.merges == len({json.dumps(h["values"]) for h in res.history})  # each distinct point merged once
    # the written recipe is the best one and merges as it was scored
    (tmp_path / "r.yml").write_text(yaml.safe_dump(_recipe(expert, 0.05)))
    r = runner.invoke(app, ["search", str(tmp_path / "r.yml"), "--tasks", "novowels", "--budget", "3", "--n", "10",
                            "--out", str(tmp_path / "best.yml")])
    assert r.exit_code == 0, r.output
    assert "as given" in r.output and "best found" in r.output
    best = yaml.safe_load((tmp_path / "best.yml").read_text())
    assert best["merge_method"] == "task_arithmetic" and "weight" in best["models"][0]["parameters"]


def test_knobs_and_refusals(expert, tmp_path):
    ties = registry.get("ties")
    r = {"merge_method": "ties", "parameters": {"density": 0.5, "normalize": True, "weight": [0.1, 0.9]},
         "models": [{"model": "a", "parameters": {"weight": 3.0}}, {"model": "b", "parameters": {"density": 1.0}}]}
    ks = {k.label: (k.low, k.high) for k in knobs(r, ties)}
    assert set(ks) == {"density", "models[0].weight", "models[1].density"}  # booleans and gradients are not searched
    assert ks["density"][0] > 0 and ks["density"][1] == 1.0 and ks["models[0].weight"] == (0.0, 6.0)
    assert {k.label for k in knobs(r, ties, ["weight"])} == {"models[0].weight"}
    with pytest.raises(MoergeError, match="sets no numeric lambda"):
        knobs(r, ties, ["lambda"])
    with pytest.raises(MoergeError, match="unknown task"):
        search(_recipe(expert), tasks="nosuch", budget=2)
    with pytest.raises(MoergeError, match="--optimizer Adam"):
        search(_recipe(expert), tasks="novowels", budget=2, optimizer="Adam")
    with pytest.raises(MoergeError, match="sets no numeric parameter"):
        search({"merge_method": "linear", "models": [{"model": str(default_base()), "parameters": {"weight": [1.0, 2.0]}}]},
               tasks="novowels", budget=2)
    r = runner.invoke(app, ["search", str(tmp_path / "missing.yml"), "--tasks", "novowels"])
    assert r.exit_code != 0 and "Traceback" not in r.output and "missing.yml" in r.output


def test_search_on_ray_scores_as_here(expert):
    pytest.importorskip("ray")
    res = search(_recipe(expert, 0.05), tasks="novowels", budget=2, n=10, ray="local", workers=2)
    assert len(res.history) == 2
    for h in res.history:  # each candidate Ray scored is what this process scores for it
        rec = _recipe(expert, h["values"]["models[0].weight"])
        assert score_recipe(rec, ["novowels"], n=10)["mean"] == h["score"]
