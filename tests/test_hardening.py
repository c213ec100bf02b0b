"""What a new user hits with wrong input: one line, exit 1, no traceback, nothing half-written; and
the shared mechanisms behind it (output paths, the base check, plain PEFT adapters, threads, logs)."""

import io
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from moerge.cli import app
from moerge.errors import MoergeError
from moerge.experts.card import ExpertCard
from moerge.lm import base as base_model
from moerge.train.expert import load_expert, train_expert

runner = CliRunner()


def fails_with(args, *needles):
    """The CLI refuses with one error line holding every needle, exit 1, and no Python exception escapes."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    for n in needles:
        assert n in res.output.replace("\n", ""), res.output
    return res.output


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


# ---------------------------------------------------------------- loading what cannot load


def test_eval_refuses_missing_truncated_and_adapter_folders_in_one_line(expert, tmp_path):
    fails_with(["eval", tmp_path / "nope", "--tasks", "sort", "--n", "2"], "no such folder")
    broken = tmp_path / "broken"
    shutil.copytree(base_model.default_base(), broken)
    truncate(broken / "model.safetensors")
    fails_with(["eval", broken, "--tasks", "sort", "--n", "2"], "model.safetensors", "truncated")
    fails_with(["eval", expert, "--tasks", "sort", "--n", "2"], "is a PEFT adapter", f"--adapter {expert}")
    bad = tmp_path / "bad-adapter"
    shutil.copytree(expert, bad)
    truncate(bad / "adapter_model.safetensors")
    fails_with(["eval", "--adapter", bad, "--tasks", "sort", "--n", "2"], "adapter_model.safetensors", "truncated")
    fails_with(["eval", "--adapter", tmp_path / "none", "--tasks", "sort", "--n", "2"], "no such expert folder")


def test_output_files_get_their_folders_or_one_line(tmp_path):
    res = runner.invoke(app, ["tasks", "export", "sort", str(tmp_path / "a" / "b" / "train.jsonl"), "--n", "5"])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "a" / "b" / "train.jsonl").read_text().splitlines()) == 5
    res = runner.invoke(app, ["eval", "--tasks", "sort", "--n", "2", "--json", str(tmp_path / "new" / "scores.json")])
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "new" / "scores.json").read_text())["scores"]) == {"sort"}
    (tmp_path / "file").write_text("x")
    fails_with(["tasks", "export", "sort", tmp_path / "file" / "x.jsonl"], "a part of its folder is a file")
    fails_with(["eval", "--tasks", "sort", "--n", "2", "--json", tmp_path / "file" / "s.json"], "a part of its folder is a file")
    fails_with(["eval", "--tasks", "sort", "--n", "2", "--json", tmp_path], "is a folder")
    fails_with(["demo", "--quick", "--out", tmp_path / "d", "--json", tmp_path / "file" / "b.json"], "a part of its folder")
    assert not (tmp_path / "d").exists()  # refused before any work


# ---------------------------------------------------------------- one base check everywhere


def test_every_command_that_applies_an_adapter_refuses_one_made_for_another_base(expert, other_base, tmp_path):
    import moerge
    from moerge.library import Library
    from moerge.routing import load_routed

    why = "was made for another base"
    fails_with(["eval", other_base, "--adapter", expert, "--tasks", "sort", "--n", "2"], why)
    with pytest.raises(MoergeError, match=why):
        load_expert(other_base, expert)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(other_base),
              "models": [{"model": f"{other_base}+{expert}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(MoergeError, match=why):
        moerge.plan(recipe)
    fails_with(["expert", "combine", expert, "--base", other_base, "--out", tmp_path / "c"], why)
    with pytest.raises(MoergeError, match=why):
        load_routed("uniform", experts=[expert], base=other_base)
    lib = Library.init(tmp_path / "lib", other_base)
    with pytest.raises(MoergeError):
        lib.add(expert, "sort")
    assert not (tmp_path / "c").exists() and lib.experts() == []
    # on its own base every one of them works
    moerge.plan(recipe | {"base_model": str(base_model.default_base()),
                          "models": [{"model": f"{base_model.default_base()}+{expert}", "parameters": {"weight": 1.0}}]})


def test_peft_base_model_name_or_path_is_checked_when_it_names_a_local_model(expert, other_base, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(expert, plain)
    (plain / "expert.json").unlink()
    cfg = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": str(other_base)}))
    with pytest.raises(MoergeError, match="says it was made for"):
        load_expert(base_model.default_base(), plain)
    # given no base, it is loaded on the one it names (its shapes fit: the check compares names and shapes)
    assert load_expert(None, plain)[0].peft_config["default"].base_model_name_or_path == str(other_base)
    (plain / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "some-org/some-model"}))
    load_expert(None, plain)  # a hub id: checked by names and shapes alone, on the built-in base


# ---------------------------------------------------------------- plain PEFT adapters are first-class


def test_plain_peft_adapters_work_wherever_an_adapter_is_accepted(expert, tmp_path):
    from moerge.library import Library

    plain = tmp_path / "plain"
    shutil.copytree(expert, plain)
    (plain / "expert.json").unlink()
    res = runner.invoke(app, ["eval", "--adapter", str(plain), "--tasks", "sort", "--n", "4"])
    assert res.exit_code == 0, res.output
    # what moerge writes itself carries a complete card, base fingerprint included
    res = runner.invoke(app, ["expert", "combine", str(plain), str(expert), "--base", str(base_model.default_base()),
                              "--out", str(tmp_path / "sum")])
    assert res.exit_code == 0, res.output
    card = ExpertCard.read(tmp_path / "sum")
    assert card.adapter == "lora" and card.base_fingerprint == ExpertCard.read(expert).base_fingerprint
    assert card.trainable_params > 0 and card.extra["made_by"] == "moerge expert combine"
    res = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "sum"), "--tasks", "sort", "--n", "4"])
    assert res.exit_code == 0, res.output
    # a library export of an expert added without a card is an adapter every command takes
    lib = Library.init(tmp_path / "lib", base_model.default_base())
    lib.add(plain, "plain")
    lib.export("plain", tmp_path / "exported")
    model, _ = load_expert(None, tmp_path / "exported")
    assert ExpertCard.read(tmp_path / "exported").base_fingerprint == lib.meta["base_fingerprint"]
    res = runner.invoke(app, ["expert", "show", str(tmp_path / "exported")])
    assert res.exit_code == 0 and "library_ref" in res.output


def test_expert_train_refuses_data_too_small_to_validate_and_pins_its_data(tmp_path):
    from moerge.tasks import examples, write_jsonl

    write_jsonl(tmp_path / "two.jsonl", examples("sort", "train", 2))
    fails_with(["expert", "train", "--data", tmp_path / "two.jsonl", "--out", tmp_path / "e", "--steps", "2"],
               "has 2 examples", "at least 20")
    assert not (tmp_path / "e").exists()
    write_jsonl(tmp_path / "many.jsonl", examples("sort", "train", 60) + examples("sort", "validation", 10))
    card = train_expert(tmp_path / "e", data=tmp_path / "many.jsonl", steps=2, batch_size=8, progress=False)
    assert card.data == str((tmp_path / "many.jsonl").resolve())
    from moerge.tasks.training_data import training_rows

    assert len(training_rows(card)) == 70
    write_jsonl(tmp_path / "many.jsonl", examples("sort", "train", 61))
    with pytest.raises(MoergeError, match="changed since the expert was trained"):
        training_rows(card)


def test_extract_refuses_a_rank_no_smaller_than_the_deltas(tmp_path):
    from moerge.lm.tiny import make_base, make_finetune

    base = make_base(tmp_path / "b", seed=0, hidden=32, layers=2, intermediate=64)
    ft = make_finetune(base, tmp_path / "ft", seed=1)
    fails_with(["expert", "extract", ft, "--base", base, "--out", tmp_path / "x", "--rank", "100000"],
               "--rank 100000", "no smaller than")
    assert not (tmp_path / "x").exists()
    res = runner.invoke(app, ["expert", "extract", str(ft), "--base", str(base), "--out", str(tmp_path / "x"), "--rank", "4"])
    assert res.exit_code == 0 and "at rank 4" in res.output, res.output
    assert ExpertCard.read(tmp_path / "x").base_fingerprint


# ---------------------------------------------------------------- threads, logs, version


def test_threads_default_to_one_and_follow_the_option_and_environment(monkeypatch):
    from moerge.util.threads import set_threads, threads_from_env

    old = torch.get_num_threads()
    try:
        monkeypatch.delenv("MOERGE_THREADS", raising=False)
        assert threads_from_env() == 1
        monkeypatch.setenv("MOERGE_THREADS", "2")
        assert set_threads() == 2 and torch.get_num_threads() == 2
        assert runner.invoke(app, ["--threads", "1", "route", "list"]).exit_code == 0 and torch.get_num_threads() == 1
        monkeypatch.setenv("MOERGE_THREADS", "two")
        fails_with(["route", "list"], "MOERGE_THREADS='two'")
        monkeypatch.delenv("MOERGE_THREADS")
        fails_with(["eval", "--threads", "0", "--tasks", "sort"], "--threads 0")
    finally:
        torch.set_num_threads(old)


def test_progress_without_a_terminal_is_plain_lines():
    from moerge.util.progress import ProgressLog

    buf = io.StringIO()
    log = ProgressLog("training lora expert: sort", 4, every=0, stream=buf)
    for loss in (2.0, 1.5, 1.0, 0.5):
        log.step(loss)
    log.done()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "training lora expert: sort: 4 steps"
    assert lines[1].startswith("training lora expert: sort: step 1/4, loss 2.000, ") and "s left" in lines[1]
    assert len(lines) == 5 and lines[-1].startswith("training lora expert: sort: done, 4 steps in") and "loss 0.500" in lines[-1]


def test_version_and_short_help():
    import moerge

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"moerge {moerge.__version__}"
    for args in (["-h"], ["merge", "-h"], ["library", "add", "-h"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and "Usage" in res.output, args


# ---------------------------------------------------------------- the demo's report agrees with its table


def test_demo_means_agree_between_table_json_and_plot(tmp_path):
    from moerge.demo import means, plot, plot_routing

    tasks, heldout = ["a", "b"], ["a_b"]
    rows = [{"model": m, "scores": s, **means(s, tasks, heldout)}
            for m, s in (("base", {"a": 0.0, "b": 0.5, "a_b": 1.0}), ("oracle", {"a": 1.0, "b": 1.0, "a_b": 0.0}))]
    assert rows[0]["mean"] == 0.25 and rows[0]["mean_heldout"] == 1.0  # seen skills only, as the table's "mean seen"
    board = {"tasks": tasks, "heldout": heldout, "rows": rows, "experts": ["a", "b"],
             "routing": {"oracle": {"a": [1, 0], "b": [0, 1], "a_b": [0.5, 0.5]},
                         "lorahub": {"a": [0.7, -0.2], "b": [0.1, 0.9], "a_b": [0.3, 0.3]}}}
    assert plot(board, tmp_path / "s.png").stat().st_size > 5000
    assert plot_routing(board, tmp_path / "r.png").stat().st_size > 5000


def test_a_recipe_dict_holding_an_unrepresentable_value_is_a_user_error():
    import moerge

    with pytest.raises(MoergeError, match="holds a value a recipe cannot have"):
        moerge.plan({"merge_method": "linear", "models": [{"model": object()}]})


def test_a_parameter_the_method_does_not_use_is_a_warning_line_and_a_typo_an_error(tiny, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {tiny['base']}\nmodels:\n  - model: {tiny['base']}\n"
                      f"    parameters: {{weight: 0.5}}\n  - model: {tiny['ft1']}\nparameters: {{t: 0.5}}\n")
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: {recipe}: line 5: models[0].parameters.weight: slerp does not use 'weight'; ignored"]
    recipe.write_text(recipe.read_text().replace("{t: 0.5}", "{t: 0.5, lamda: 1}"))
    fails_with(["merge", recipe, tmp_path / "out2"], "parameters.lamda: unknown parameter; did you mean 'lambda'?")


def test_routing_a_library_leaves_full_fine_tunes_out_with_a_warning(expert, tmp_path):
    import warnings

    from moerge.errors import MoergeWarning
    from moerge.library import Library
    from moerge.routing import load_routed

    train_expert(tmp_path / "full", task="reverse", adapter="full", steps=2, n_train=16, batch_size=8, progress=False)
    lib = Library.init(tmp_path / "lib", base_model.default_base())
    lib.add(expert, "sort")
    lib.add(tmp_path / "full", "rev")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        routed = load_routed("uniform", library=lib.root)
    assert routed.names == ["sort@1"]
    assert [str(w.message) for w in caught if issubclass(w.category, MoergeWarning)] == [
        "rev@1 left out: full fine-tunes are merged, not routed"]
    with pytest.raises(MoergeError, match="rev@1: a full fine-tune; routers mix adapters"):
        load_routed("uniform", library=lib.root, experts=["sort", "rev"])


def test_outputs_never_overwrite_inputs(tmp_path):
    """--json, search --out and an --overwrite output folder that would replace what the command
    reads are refused before any work, and the input is left as it was."""
    from moerge.lm.base import default_base
    from moerge.tasks import examples, write_jsonl

    data = write_jsonl(tmp_path / "mine.jsonl", examples("reverse", "test", 60))
    before = data.read_bytes()
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {default_base()}\n  - model: {default_base()}\n")
    weights = default_base() / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    cases = [["eval", "--tasks", str(data), "--n", "2", "--json", str(data)],
             ["eval", str(default_base()), "--tasks", "reverse", "--n", "2", "--json", str(weights)],
             ["search", str(recipe), "--tasks", "reverse", "--budget", "2", "--n", "2", "--out", str(recipe)],
             ["expert", "train", "--data", str(data), "--steps", "1", "--out", str(tmp_path), "--overwrite"]]
    for args in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and "would overwrite the input" in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
    assert data.read_bytes() == before and weights.stat().st_mtime_ns == stamp
    # a new file beside an input is fine; options that would be ignored are refused
    r = runner.invoke(app, ["eval", "--tasks", str(data), "--n", "2", "--json", str(tmp_path / "scores.json")])
    assert r.exit_code == 0 and (tmp_path / "scores.json").is_file(), r.output
    for args, needle in ((["eval", "--tasks", "reverse", "--limit", "3"], "--limit applies to --lm-eval"),
                         (["eval", "--tasks", "reverse", "--n", "0"], "--n must be at least 1"),
                         (["eval", "--tasks", "reverse", "--lm-eval", "x.yaml"], "--tasks and --lm-eval: give one")):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and needle in r.output, (args, r.output)


def test_usage_errors_are_one_line():
    """The console command: an option out of range or unknown is one error line naming it, exit 2."""
    import subprocess
    import sys

    for args, needle in ((["eval", "--limit", "0"], "'--limit'"), (["eval", "--bogus"], "No such option: --bogus")):
        proc = subprocess.run([sys.executable, "-m", "moerge.cli", *args], capture_output=True, text=True)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
        assert "eval -h`" in lines[0] and "Traceback" not in proc.stderr
