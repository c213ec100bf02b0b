"""ColD Fusion: base versions in the library, `moerge fuse`, `expert rebase`, `fuse simulate`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moerge.cli import app
from moerge.errors import MoergeError
from moerge.fusion import fuse, plan_fuse, rebase, simulate
from moerge.library import Library
from moerge.lm import base as base_model
from moerge.train.expert import load_expert, train_expert

runner = CliRunner()


def merged(base_dir, expert_dir) -> dict[str, torch.Tensor]:
    """base + expert as PEFT merges it: an independent reference for the fused tensors."""
    model, _ = load_expert(base_dir, expert_dir)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def contribs(tmp_path_factory):
    root = tmp_path_factory.mktemp("contribs")
    out = {}
    for name, task, adapter, seed in (("rev", "reverse", "lora", 0), ("up", "uppercase", "full", 1),
                                      ("srt", "sort", "lora", 2)):
        train_expert(root / name, task=task, adapter=adapter, steps=2, n_train=32, batch_size=8, seed=seed, progress=False)
        out[name] = root / name
    return out


@pytest.fixture()
def lib(tmp_path, contribs):
    lib = Library.init(tmp_path / "lib", base_model.default_base())
    lib.add(contribs["rev"], "rev", contributor="ann")
    lib.add(contribs["up"], "up", contributor="bob")
    return lib


def test_fuse_averages_contributions_into_the_next_base(lib, contribs):
    base_dir = base_model.default_base()
    res = fuse(lib, method="average")
    new = res.base
    assert new.ref == "base@2" and lib.base().version == 2 and [b.ref for b in lib.bases()] == ["base@1", "base@2"]
    assert new.path == lib.root / "bases" / "v2" and (new.path / "config.json").is_file()
    got = weights(new.path)
    a, b = merged(base_dir, contribs["rev"]), merged(base_dir, contribs["up"])
    for name, t in got.items():
        torch.testing.assert_close(t, (a[name] + b[name]) / 2, atol=1e-6, rtol=1e-5)
    # the card: lineage of the new base
    card = new.card
    assert card["parent"] == 1 and card["method"] == "average"
    assert [c["expert"] for c in card["contributions"]] == ["rev@1", "up@1"]
    assert [c["contributor"] for c in card["contributions"]] == ["ann", "bob"]
    assert json.loads((new.path / "moerge_fusion.json").read_text()) == card
    assert "library://rev@1" in (new.path / "moerge_recipe.yaml").read_text()
    # the fused base loads and is a base like any other
    model, tok = base_model.load(new.path)
    assert model.config.num_hidden_layers == 4
    # the next round: experts on base@1 are not contributions to base@3
    with pytest.raises(MoergeError, match=r"has no contributions on base@2"):
        fuse(lib)
    with pytest.raises(MoergeError, match=r"rev@1: was made on base@1, but fusing makes base@3 from contributions on base@2"):
        fuse(lib, experts=["rev@1"])


def test_experts_record_their_base_version(lib, contribs, tmp_path):
    fuse(lib)
    new = lib.base()
    # an expert trained on base@1 is refused now, naming both versions
    with pytest.raises(MoergeError, match=r"srt: was made on base@1 of this library, but contributions now go to base@2; "
                                          r"re-apply it there: moerge expert rebase"):
        lib.add(contribs["srt"], "srt")
    # one trained on base@2 is a contribution to base@3
    train_expert(tmp_path / "on2", base=new.path, task="sort", steps=2, n_train=32, batch_size=8, progress=False)
    e = lib.add(tmp_path / "on2", "srt")
    assert e.base_version == 2 and lib.get("rev").base_version == 1
    assert [x.ref for x in lib.experts(base_version=2)] == ["srt@1"]
    assert plan_fuse(lib).contributions[0].ref == "srt@1"
    # library:// references apply an expert to the base it was made on
    import moerge

    out = moerge.merge({"merge_method": "linear", "models": [{"model": "library://rev@1", "parameters": {"weight": 1.0}}]},
                       tmp_path / "m", library=lib.root, progress=False)
    ref = merged(base_model.default_base(), contribs["rev"])
    for k, v in weights(out.out_dir).items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-5)


def test_exclude_keeps_the_base_tensors(lib):
    base = weights(base_model.default_base())
    res = fuse(lib, exclude=["model.embed_tokens.*", "*.layers.0.*"])
    got = weights(res.base.path)
    kept = [n for n in got if n.startswith("model.embed_tokens") or ".layers.0." in n]
    assert kept and all(torch.equal(got[n], base[n]) for n in kept)
    assert any(not torch.equal(got[n], base[n]) for n in got if n not in kept)
    assert res.base.card["excluded_tensors"] == len(kept)


def test_bad_fusions_are_one_line_and_register_nothing(lib, monkeypatch):
    with pytest.raises(MoergeError, match=r"--exclude 'lm_haed\.\*': matches no tensor of the base; names look like"):
        fuse(lib, exclude=["lm_haed.*"])
    with pytest.raises(MoergeError, match=r"--method 'avg': unknown merge method; use average or one of"):
        fuse(lib, method="avg")
    with pytest.raises(MoergeError, match=r"no expert 'nope'"):
        fuse(lib, experts=["nope"])
    # a failure mid-merge: no base registered, no folder left
    from moerge.engine import executor

    real = executor.run_task
    calls = {"n": 0}

    def failing(plan, task, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MoergeError("disk full")
        return real(plan, task, *a, **kw)

    monkeypatch.setattr(executor, "run_task", failing)
    with pytest.raises(MoergeError, match="disk full"):
        fuse(lib)
    assert [b.ref for b in lib.bases()] == ["base@1"] and not any((lib.root / "bases").iterdir())


def test_crash_before_registering_leaves_no_base_and_the_next_fusion_recovers(lib):
    code = "from moerge.fusion import fuse; fuse(%r)" % str(lib.root)
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MOERGE_CRASH_AT="before-base-commit"),
                       capture_output=True, text=True)
    assert r.returncode == 137
    assert [b.ref for b in Library.open(lib.root).bases()] == ["base@1"]  # the folder exists, unregistered
    assert (lib.root / "bases" / "v2").is_dir()
    assert fuse(lib).base.ref == "base@2"  # replaced, then registered


def test_rebase_adapter_and_full_finetune(lib, contribs, tmp_path):
    fuse(lib)
    b1, b2 = weights(base_model.default_base()), weights(lib.base().path)
    res = rebase(lib, "rev", n_eval=10, refit=False)
    assert res.entry.card["centroid_base"] == lib.base().fingerprint  # routers reach it on the new base
    assert res.entry.ref == "rev@2" and res.entry.base_version == 2 and (res.from_version, res.to_version) == (1, 2)
    assert res.task == "reverse" and 0 <= res.before <= 1 and 0 <= res.after <= 1
    old, new = lib.tensors("rev@1"), lib.tensors("rev@2")  # an adapter's factors carry over unchanged
    assert new.keys() == old.keys() and all(torch.equal(v, old[k]) for k, v in new.items())
    assert res.entry.card["rebased"]["from_base"] == "base@1"
    # a full fine-tune carries its delta: new base + (fine-tune - old base)
    full = rebase(lib, "up@1", evaluate=False)
    assert full.before is None and full.entry.base_version == 2
    ft = weights(contribs["up"])
    out = lib.export(full.entry.ref, tmp_path / "up2")
    got = weights(out)
    for n in b2:
        torch.testing.assert_close(got[n], b2[n] + (ft[n] - b1[n]), atol=1e-6, rtol=1e-5)
    # an adapter folder made on base@1 (outside the library) goes in rebased
    r3 = rebase(lib, contribs["srt"], evaluate=False)
    assert r3.entry.ref == "srt@1" and r3.entry.base_version == 2
    with pytest.raises(MoergeError, match="is already made on base@2"):
        rebase(lib, "srt", evaluate=False)
    with pytest.raises(MoergeError, match="has no base@7"):
        rebase(lib, "rev@1", to=7)


def test_rebase_refits_an_expert_that_lost_skill(lib, tmp_path):
    """Re-fit: the carried factors trained further on the new base, from their own values, on the
    expert's own data; decided by what the carried expert keeps of its score."""
    fuse(lib)
    new_fp = lib.base().fingerprint
    forced = rebase(lib, "rev", evaluate=False, refit_steps=3)  # re-fit without measuring: exactly the steps asked
    assert forced.refit_steps == 3 and forced.before is None and forced.notes == ()
    old, new = lib.tensors("rev@1"), lib.tensors(forced.entry.ref)
    assert new.keys() == old.keys() and any(not torch.equal(v, old[k]) for k, v in new.items())
    card = forced.entry.card
    assert card["rebased"]["refit_steps"] == 3 and card["centroid_base"] == new_fp and len(card["centroids"]) > 0
    # measured: re-fitted exactly when the carried expert keeps less than `keep` of its score
    res = rebase(lib, "rev@1", name="rev_auto", n_eval=10, keep=1.0, refit_steps=2)
    assert res.carried is not None and res.before is not None
    assert (res.refit_steps == 2) == (res.carried < res.before)
    if res.refit_steps:
        assert res.entry.card["rebased"]["exact_match_carried"] == res.carried
    assert res.entry.card["rebased"]["exact_match_after"] == res.after
    # chunks of --refit-steps, each followed by a validation score, until it keeps its share: at most
    # the expert's own training steps (2 here)
    res = rebase(lib, "rev@1", name="rev_chunks", n_eval=10, keep=1.0, refit_steps=1)
    if res.refit_steps:
        history = res.entry.card["rebased"]["refit_validation"]
        assert 1 <= res.refit_steps <= 2 and len(history) == res.refit_steps
    # a full fine-tune re-fits as a model
    full = rebase(lib, "up@1", evaluate=False, refit_steps=2)
    assert full.refit_steps == 2 and full.entry.kind == "full"
    with pytest.raises(MoergeError, match="keep 0"):
        rebase(lib, "rev@1", keep=0)
    with pytest.raises(MoergeError, match="--refit-steps 0"):
        rebase(lib, "rev@1", refit_steps=0)


def test_rebase_without_data_says_why_it_was_not_refitted(lib, contribs, tmp_path):
    import shutil

    fuse(lib)
    folder = tmp_path / "nodata"
    shutil.copytree(contribs["srt"], folder)
    card = json.loads((folder / "expert.json").read_text())
    (folder / "expert.json").write_text(json.dumps(card | {"data": str(tmp_path / "gone.jsonl"), "task": "mine"}))
    res = rebase(lib, folder, evaluate=False, refit_steps=2)
    assert res.refit_steps == 0 and "not re-fitted" in res.notes[0] and "gone.jsonl" in res.notes[0]
    assert "no task centroids on base@2" in res.notes[1] and res.entry.card["rebased"]["notes"] == list(res.notes)
    # measured, it says why it could not be: the data the card names is gone (not "no JSONL data")
    res = rebase(lib, folder, name="nodata2", n_eval=5)
    assert res.before is None and res.notes[0].startswith("not measured: its data") and "gone.jsonl" in res.notes[0]
    with pytest.raises(MoergeError, match="--n-eval 0"):
        rebase(lib, folder, n_eval=0)
    with pytest.raises(MoergeError, match="--refit-steps 3 with --no-refit"):
        rebase(lib, folder, refit=False, refit_steps=3)
    with pytest.raises(MoergeError, match="no such expert folder"):
        rebase(lib, tmp_path / "nope")


def test_rebase_scores_a_jsonl_expert_on_its_own_data_even_under_a_skill_s_name(lib, tmp_path):
    """A user's JSONL task named like a built-in skill is scored on the user's rows, and the rebased
    card and PEFT config name the new base by its absolute path."""
    from moerge.tasks import examples

    fuse(lib)
    rows = examples("reverse", "train", 200) + examples("reverse", "test", 60)
    data = tmp_path / "sort.jsonl"  # named like the built-in `sort`, holding reversals
    data.write_text("".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in rows))
    train_expert(tmp_path / "mine", base=lib.base(1).path, data=data, steps=2, batch_size=8, progress=False)
    from moerge.fusion.rebase import _eval_rows

    got, why = _eval_rows("sort", json.loads((tmp_path / "mine" / "expert.json").read_text()), 100)
    assert why is None and got
    prompts = {r.prompt for r in rows}
    assert all(r.prompt in prompts for r in got)  # the user's rows, not the built-in skill's
    res = rebase(lib, tmp_path / "mine", n_eval=10, refit=False)
    card = res.entry.card
    assert card["base"] == str(lib.base().path.absolute()) and card["rebased"]["test_prompts"] == len(got[:10])
    out = lib.export(res.entry.ref, tmp_path / "exported")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == card["base"]


def test_cli_fuse_bases_rebase(lib, tmp_path):
    r = runner.invoke(app, ["fuse", "--library", str(lib.root), "--dry-run"])
    assert r.exit_code == 0 and "2 contribution(s) on base@1 -> base@2" in r.output and not (lib.root / "bases").exists()
    r = runner.invoke(app, ["fuse", "--library", str(lib.root), "--eval", "nope"])
    assert r.exit_code == 1 and "nope" in r.output and not (lib.root / "bases" / "v2").exists()
    r = runner.invoke(app, ["fuse", "--library", str(lib.root), "--method", "ties", "--param", "density=0.5", "-q",
                            "--eval", "reverse,uppercase", "--n-eval", "5"])
    assert r.exit_code == 0, r.output
    assert "into base@2 (ties)" in r.output and "reverse:" in r.output
    card = lib.base().card
    assert card["parameters"] == {"density": 0.5}
    assert set(card["scores"]["zero_shot"]) == set(card["scores"]["parent_zero_shot"]) == {"reverse", "uppercase"}
    r = runner.invoke(app, ["library", "bases", "--library", str(lib.root)])
    assert r.exit_code == 0 and "base@2" in r.output and "rev@1, up@1" in r.output
    r = runner.invoke(app, ["expert", "rebase", "rev", "--library", str(lib.root), "--n-eval", "5", "--no-refit"])
    assert r.exit_code == 0 and "stored rev@2" in r.output and "reverse:" in r.output, r.output
    r = runner.invoke(app, ["expert", "rebase", "rev@1", "--name", "rev_b", "--library", str(lib.root), "--no-eval",
                            "--refit-steps", "2"])
    assert r.exit_code == 0 and "stored rev_b@1" in r.output and "re-fitted 2 steps (not measured)" in r.output, r.output
    r = runner.invoke(app, ["expert", "rebase", "rev@1", "--library", str(lib.root), "--keep", "1.5"])
    assert r.exit_code == 1 and "keep 1.5" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["fuse", "--library", str(lib.root), "--param", "density"])
    assert r.exit_code == 1 and "write NAME=VALUE" in r.output
    r = runner.invoke(app, ["fuse", "--library", str(tmp_path / "nolib")])
    assert r.exit_code == 1 and "not an expert library" in r.output


SIM = dict(rounds=2, contributors=2, tasks=["reverse", "uppercase"], steps=3, finetune_steps=3, batch_size=8, n_eval=8,
           seen_finetune=True)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    d = tmp_path_factory.mktemp("serial")
    return d, simulate(d / "sim", **SIM, json_file=d / "r.json", plot_file=d / "c.png")


def test_simulate_two_rounds(serial, tmp_path):
    d, res = serial
    data = json.loads((d / "r.json").read_text())
    assert set(data["original"]) >= {"seen", "heldout_finetuned"} and len(data["rounds"]) == 2
    assert data["heldout_tasks"] == ["reverse_uppercase"]
    for i, row in enumerate(data["rounds"], 1):
        assert row["round"] == i and row["base"] == f"base@{i + 1}" and len(row["contributors"]) == 2
        assert 0 <= row["seen"] <= 1 and 0 <= row["heldout_finetuned"] <= 1
        assert set(row["seen_tasks"]) <= {"reverse", "uppercase"}
        assert set(row["finetuned"]) == set(row["seen_tasks"]) and 0 <= row["seen_finetuned"] <= 1
        assert row["seen_finetuned_original"] == sum(data["original"]["finetuned"][t] for t in row["seen_tasks"]) / len(
            row["seen_tasks"])
    lib = Library.open(d / "sim" / "library")
    assert [b.ref for b in lib.bases()] == ["base@1", "base@2", "base@3"]
    assert lib.base(3).card["scores"]["zero_shot"] == data["rounds"][1]["scores"]
    assert (d / "c.png").stat().st_size > 1000 and res["rounds"][1]["base"] == "base@3"
    assert (d / "sim" / "curves.png").is_file() and data["original"]["all"] == data["original"]["seen"]
    assert data["library"] == str(d / "sim" / "library")
    with pytest.raises(MoergeError, match="already exists"):
        simulate(d / "sim", rounds=1)
    with pytest.raises(MoergeError, match="--heldout reverse: is also a contributor task"):
        simulate(tmp_path / "sim2", tasks=["reverse", "sort"], heldout=["reverse"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(MoergeError, match="is not the output of an earlier"):
        simulate(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_simulate_on_a_local_ray_matches_the_serial_run(serial, tmp_path):
    """The same two rounds as Ray tasks on a local Ray with 2 CPUs: the same bases and scores as the
    serial path (every job is seeded and runs with one torch thread)."""
    pytest.importorskip("ray")
    d, serial = serial
    on_ray = simulate(tmp_path / "b", ray="local", **SIM)
    import ray

    assert not ray.is_initialized()  # the Ray it started is shut down
    assert on_ray["settings"]["ray"] is True
    for a, b in zip(serial["rounds"], on_ray["rounds"]):
        assert [c["task"] for c in a["contributors"]] == [c["task"] for c in b["contributors"]]
        assert a["scores"] == b["scores"] and a["heldout"] == b["heldout"] and a["finetuned"] == b["finetuned"]
    fa = Library.open(d / "sim" / "library").base(3).fingerprint
    assert fa == Library.open(tmp_path / "b" / "library").base(3).fingerprint


def test_second_round_with_a_relative_library_and_ties(lib, contribs, tmp_path, monkeypatch):
    """A fused base's folder is a plain path: methods that take the base (ties) work in later rounds,
    with the library given relative to the current folder."""
    fuse(lib)
    train_expert(tmp_path / "on2", base=lib.base().path, task="sort", steps=2, n_train=32, batch_size=8, progress=False)
    lib.add(tmp_path / "on2", "srt")
    monkeypatch.chdir(lib.root.parent)
    r = runner.invoke(app, ["fuse", "--library", lib.root.name, "--method", "ties", "--param", "density=0.5", "-q"])
    assert r.exit_code == 0, r.output
    assert "into base@3 (ties)" in r.output and Library.open(lib.root).base(3).path == lib.root / "bases" / "v3"
    # a folder whose name holds '@' is a folder, not NAME@REVISION
    at = tmp_path / "model@2"
    (tmp_path / "model@2").mkdir()
    from moerge.engine.recipe import split_ref

    monkeypatch.chdir(tmp_path)
    assert split_ref("model@2") == ("model@2", None, None) and split_ref("org/name@v1") == ("org/name", "v1", None)
    assert at.is_dir()


def test_data_aware_fusion_takes_only_the_contributions(lib, contribs):
    """RegMean ignores a base: the fused base is the contributions' RegMean merge, with the parent base
    not slipped in as one more input (which has no data to weigh it by)."""
    res = fuse(lib, method="regmean")
    assert res.base.ref == "base@2" and res.base.card["method"] == "regmean"
    got = weights(res.base.path)
    a, b = merged(base_model.default_base(), contribs["rev"]), merged(base_model.default_base(), contribs["up"])
    q = "model.layers.0.self_attn.q_proj.weight"  # a linear layer: a Gram-weighted mix, unlike the plain mean
    assert not torch.allclose(got[q], (a[q] + b[q]) / 2, atol=1e-6)
    norm = "model.norm.weight"  # not a linear layer: RegMean averages it
    torch.testing.assert_close(got[norm], (a[norm] + b[norm]) / 2, atol=1e-6, rtol=1e-5)


def test_fuse_option_errors_name_the_option(lib):
    with pytest.raises(MoergeError, match=r"^--param density=abc: must be a number"):
        fuse(lib, method="ties", parameters={"density": "abc"})
    with pytest.raises(MoergeError, match=r"--param alpha: linear does not use it \(it takes weight"):
        fuse(lib, method="average", parameters={"alpha": 1.5})
    with pytest.raises(MoergeError, match=r"--experts: empty"):
        fuse(lib, experts=[])
    with pytest.raises(MoergeError, match=r"--experts: rev is given twice"):
        fuse(lib, experts=["rev", "rev"])
    with pytest.raises(MoergeError, match=r"--experts: rev and rev@1 are both rev@1"):
        fuse(lib, experts=["rev", "rev@1"])
    with pytest.raises(MoergeError, match=r"--n-eval must be at least 1"):
        plan_fuse(lib, eval_tasks="reverse", n_eval=0)
    with pytest.raises(MoergeError, match=r"nosuchtask"):
        plan_fuse(lib, eval_tasks="nosuchtask")
    r = runner.invoke(app, ["fuse", "--library", str(lib.root), "--param", "density=0.5", "--param", "density=0.6"])
    assert r.exit_code == 1 and "--param density: given twice" in r.output
    assert [b.ref for b in lib.bases()] == ["base@1"]


def test_simulate_checks_options_first_and_replaces_only_when_complete(serial, tmp_path, monkeypatch):
    d, _ = serial
    with pytest.raises(MoergeError, match=r"--method 'tiez': unknown merge method"):
        simulate(tmp_path / "s1", method="tiez")
    with pytest.raises(MoergeError, match=r"curves.txt: curves \(--plot\) are drawn as .png"):
        simulate(tmp_path / "s2", plot_file=tmp_path / "curves.txt")
    with pytest.raises(MoergeError, match=r"--param density=5: must be in \(0, 1\]"):  # before any fine-tune
        simulate(tmp_path / "s1", method="ties", parameters={"density": 5})
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    # an --overwrite run that fails leaves the earlier run as it was
    import importlib

    sim_mod = importlib.import_module("moerge.fusion.simulate")  # the module (the package exports the function)
    before = sorted(p.name for p in (d / "sim" / "library" / "bases").iterdir())

    def boom(*a, **k):
        raise MoergeError("interrupted")

    monkeypatch.setattr(sim_mod, "_loop", boom)
    with pytest.raises(MoergeError, match="interrupted"):
        simulate(d / "sim", overwrite=True, **SIM)
    assert sorted(p.name for p in (d / "sim" / "library" / "bases").iterdir()) == before == ["v2", "v3"]
    assert not [p for p in d.iterdir() if p.name.startswith(".sim.partial")]


def test_push_and_pull_carry_fused_bases(lib, contribs, tmp_path):
    """A library with fused bases pushes them (same version, same fingerprint, the card) before the experts
    made on them, so library:// works there; a library that fused differently is refused, nothing copied."""
    fuse(lib)
    train_expert(tmp_path / "on2", base=lib.base().path, task="sort", steps=2, n_train=32, batch_size=8, progress=False)
    lib.add(tmp_path / "on2", "srt")
    r = runner.invoke(app, ["library", "push", str(tmp_path / "copy"), "--library", str(lib.root)])
    assert r.exit_code == 0 and "pushed 3 expert versions" in r.output and "1 fused base version(s): base@2" in r.output
    copy = Library.open(tmp_path / "copy")
    assert [(b.version, b.fingerprint) for b in copy.bases()] == [(b.version, b.fingerprint) for b in lib.bases()]
    assert copy.base(2).path == copy.root / "bases" / "v2" and copy.base(2).card["contributions"]
    assert copy.get("srt").base_version == 2
    from moerge.engine.plan import open_model

    m = open_model("library://srt", library=copy.root)
    name = next(iter(copy.load("srt@1").updates))
    assert torch.equal(m.source.get(name), open_model("library://srt", library=lib.root).source.get(name))
    r = runner.invoke(app, ["library", "push", str(tmp_path / "copy"), "--library", str(lib.root)])
    assert r.exit_code == 0 and "pushed 0 expert versions" in r.output and "base@" not in r.output
    # another library of the same base1 that fused other contributions: refused before anything is copied
    other = Library.init(tmp_path / "other", base_model.default_base())
    other.add(contribs["srt"], "srt0")
    fuse(other)
    before = sorted(p.name for p in (tmp_path / "other").rglob("*"))
    r = runner.invoke(app, ["library", "push", str(tmp_path / "other"), "--library", str(lib.root)])
    assert r.exit_code == 1 and "base@2 differs from ours" in r.output and "nothing was copied" in r.output
    assert sorted(p.name for p in (tmp_path / "other").rglob("*")) == before
    # pull goes the other way with the same rules
    fresh = Library.init(tmp_path / "fresh", base_model.default_base())
    assert "base@2" in fresh.pull(lib.root) and fresh.base().fingerprint == lib.base().fingerprint


def test_simulate_picks_the_suite_of_the_base(tmp_path):
    """By default the contributors draw from the suite of the base's kind (a chat model: the real-model
    suite, as the demo), and the held-out tasks are that suite's composites of the pool's skills."""
    from moerge.fusion.simulate import task_sets
    from moerge.lm import base as base_model
    from moerge.tasks import skills

    pool, held = task_sets(None, None, None)  # the tiny base
    assert pool == list(skills.EXPERTS) and held and set(held) <= set(skills.HELDOUT)
    model, tok = base_model.load()
    chat = tmp_path / "chat"
    model.save_pretrained(chat)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(chat)
    pool, held = task_sets(chat, None, None)
    assert pool == list(skills.REAL_EXPERTS) and sorted(held) == sorted(skills.REAL_HELDOUT)
    pool, held = task_sets(chat, ["reverse_words", "caps"], None)
    assert held == ["reverse_words_caps"]
