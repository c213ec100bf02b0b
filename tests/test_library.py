"""The expert library: versions, dedup, export round-trips, refusals, concurrency, crashes, corruption."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from moerge.errors import MoergeError
from moerge.library import KINDS, Library, LibraryWarning, NothingAdded
from moerge.lm import base as base_model
from moerge.train.expert import load_expert, train_expert


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for name, task, adapter, seed in (("rev", "reverse", "lora", 0), ("rev2", "reverse", "lora", 1),
                                      ("srt", "sort", "dora", 0), ("up", "uppercase", "ia3", 0)):
        train_expert(root / name, task=task, adapter=adapter, steps=2, n_train=32, batch_size=8, seed=seed, progress=False)
        out[name] = root / name
    return out


@pytest.fixture()
def lib(tmp_path):
    return Library.init(tmp_path / "lib", base_model.default_base())


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moerge.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def test_add_versions_list_and_dedup(lib, experts):
    a = lib.add(experts["rev"], "reverse-expert", tags=["skills"], contributor="ann", license="mit")
    size = lib.stats()["stored_bytes"]
    with pytest.warns(LibraryWarning, match="same tensors as reverse-expert@1"):
        b = lib.add(experts["rev"], "reverse-copy")  # the same adapter under another name: no new bytes
    assert (a.ref, b.ref) == ("reverse-expert@1", "reverse-copy@1")
    assert lib.stats()["stored_bytes"] == size and a.digest == b.digest
    assert lib.add(experts["rev2"], "reverse-expert").ref == "reverse-expert@2"
    lib.add(experts["srt"], "sort-expert")
    lib.add(experts["up"], "upper-expert")
    assert a.task == "reverse" and a.card["base_fingerprint"] == lib.meta["base_fingerprint"] and a.license == "mit"
    assert [e.ref for e in lib.experts(task="reverse")] == ["reverse-copy@1", "reverse-expert@1", "reverse-expert@2"]
    assert [e.kind for e in lib.experts(latest=True)] == ["lora", "lora", "dora", "ia3"]
    assert [e.ref for e in lib.experts(tag="skills")] == ["reverse-expert@1"]
    assert lib.get("reverse-expert").version == 2
    assert lib.verify() == ([], [])


@pytest.mark.parametrize("name", ["rev", "srt", "up"])
def test_export_round_trips_through_peft(lib, experts, name, tmp_path):
    lib.add(experts[name], "x")
    lib.export("x@1", tmp_path / "out")
    want, tok = load_expert(None, experts[name])
    got, _ = load_expert(None, tmp_path / "out")
    ids = tok(["reverse: abc=", "sort: zyxwvu="], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(want(ids).logits, got(ids).logits)
    with pytest.raises(MoergeError, match="already exists"):
        lib.export("x", tmp_path / "out")


def test_refusals(lib, experts, tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["base"]), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "other")
    with pytest.raises(MoergeError, match="made for another base|made for .*whose weights differ"):
        lib.add(tmp_path / "other", "other")
    forged = tmp_path / "forged"
    forged.mkdir()
    for f in experts["rev"].iterdir():
        (forged / f.name).write_bytes(f.read_bytes())
    card = json.loads((forged / "expert.json").read_text()) | {"base_fingerprint": "sha256:0000"}
    (forged / "expert.json").write_text(json.dumps(card))
    with pytest.raises(MoergeError, match="was made for another base.*fingerprint sha256:0000"):
        lib.add(forged, "forged")
    for bad in ("../x", "/abs", "a b", "", ".hidden", "x/y", "a..b"):
        with pytest.raises(MoergeError, match="not a valid expert name"):
            lib.add(experts["rev"], bad)
    with pytest.raises(MoergeError, match="no expert 'nope'"):
        lib.get("nope")
    assert lib.experts() == [] and lib.stats()["blobs"] == 0


def test_bin_adapters_are_read_weights_only(lib, experts, tmp_path):
    from moerge.experts import read_adapter

    config, tensors = read_adapter(experts["rev"])
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "adapter_model.bin")
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(LibraryWarning, match="same tensors as from-bin@1"):
        assert lib.add(tmp_path / "bin", "from-bin").digest == lib.add(experts["rev"], "from-st").digest


def test_four_concurrent_writers(lib, experts):
    procs = [subprocess.Popen([sys.executable, "-m", "moerge.cli", "library", "add", str(experts[n]), "--name", "shared",
                               "--library", str(lib.root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in ("rev", "rev2", "srt", "up")]
    results = [p.communicate() + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert sorted(e.version for e in lib.experts()) == [1, 2, 3, 4]
    assert {e.kind for e in lib.experts()} == {"lora", "dora", "ia3"}
    assert lib.verify() == ([], [])


@pytest.mark.parametrize("where", ["after-blobs", "before-commit"])
def test_a_killed_add_leaves_no_half_expert(lib, experts, where):
    res = cli("library", "add", str(experts["srt"]), "--name", "doomed", "--library", str(lib.root), env={"MOERGE_CRASH_AT": where})
    assert res.returncode == 137
    assert lib.experts() == []
    problems, orphans = lib.verify()
    assert problems == [] and orphans  # blobs without an expert: not corruption
    assert lib.gc(min_age_seconds=0) == len(orphans) and lib.verify() == ([], [])
    assert lib.add(experts["srt"], "doomed").ref == "doomed@1"


def test_verify_names_the_corrupt_expert_and_tensor(lib, experts):
    lib.add(experts["up"], "up")
    blob = next(p for p in (lib.root / "blobs").glob("??/*"))
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    problems, _ = lib.verify()
    assert len(problems) == 1 and problems[0].startswith("up@1 tensor base_model.model.") and "corrupt" in problems[0]
    res = cli("library", "verify", "--library", str(lib.root))
    assert res.returncode == 1 and "up@1 tensor" in res.stderr


def test_rm_then_gc_frees_blobs_and_cli_flow(lib, experts, tmp_path):
    assert cli("library", "add", str(experts["rev"]), "--name", "r", "--tags", "a,b", "--library", str(lib.root)).returncode == 0
    listing = cli("library", "list", "--library", str(lib.root))
    assert listing.returncode == 0 and "r@1" in listing.stdout
    assert json.loads(cli("library", "show", "r@1", "--json", "--library", str(lib.root)).stdout)["tags"] == ["a", "b"]
    assert cli("library", "export", "r", str(tmp_path / "e"), "--library", str(lib.root)).returncode == 0
    assert lib.remove("r") == ["r@1"]
    assert lib.gc(min_age_seconds=0) > 0 and lib.stats()["blobs"] == 0
    res = cli("library", "rm", "r", "--library", str(lib.root))
    assert res.returncode == 1 and "no expert 'r'" in res.stderr
    res = cli("library", "list", "--library", str(tmp_path))
    assert res.returncode == 1 and "not an expert library" in res.stderr


def test_eval_scores_a_library_expert_by_its_ref(lib, experts, monkeypatch):
    """`moerge eval --adapter library://NAME` scores the stored expert on the base it was made on,
    exactly as its folder scores."""
    from typer.testing import CliRunner

    from moerge.api import evaluate
    from moerge.cli import app

    lib.add(experts["rev"], "r")
    by_ref = evaluate(adapter="library://r", tasks="reverse", n=6, library=lib.root)
    by_folder = evaluate(adapter=experts["rev"], tasks="reverse", n=6)
    assert by_ref.scores == by_folder.scores and by_ref.meta["adapter"] == "library://r@1"
    monkeypatch.setenv("MOERGE_LIBRARY", str(lib.root))
    res = CliRunner().invoke(app, ["eval", "--adapter", "library://r@1", "--tasks", "reverse", "--n", "4"])
    assert res.exit_code == 0 and "library://r@1" in res.output, res.output
    res = CliRunner().invoke(app, ["eval", "--adapter", "library://nope", "--tasks", "reverse", "--n", "4"])
    assert res.exit_code == 1 and "nope" in res.output and "Traceback" not in res.output


def test_recipes_name_library_experts(lib, experts, tmp_path):
    from safetensors.torch import load_file

    import moerge

    lib.add(experts["rev"], "rev")
    lib.add(experts["srt"], "srt")
    lib.add(experts["up"], "srt")  # srt@2: the (IA)3 one; srt@1 stays the DoRA one
    base = base_model.default_base()

    def recipe(a, b):
        return {"merge_method": "task_arithmetic", "base_model": str(base),
                "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.5}}]}

    got = moerge.merge(recipe("library://rev", "library://srt@1"), tmp_path / "a", library=lib.root)
    want = moerge.merge(recipe(f"{base}+{experts['rev']}", f"{base}+{experts['srt']}"), tmp_path / "b")
    a, b = load_file(got.out_dir / "model.safetensors"), load_file(want.out_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "library://srt@1" in (got.out_dir / "README.md").read_text()
    with pytest.raises(MoergeError, match="no expert 'srt@3'"):
        moerge.plan(recipe("library://rev", "library://srt@3"), library=lib.root)
    res = cli("merge", "-", str(tmp_path / "c"), "--library", str(lib.root))  # unknown path: one error line
    assert res.returncode == 1


def test_push_and_pull_send_only_what_is_missing(lib, experts, tmp_path, tiny):
    lib.add(experts["rev"], "rev")
    with pytest.warns(LibraryWarning):
        lib.add(experts["rev"], "rev-copy")  # same blobs
    lib.add(experts["up"], "up")
    assert lib.push(tmp_path / "mirror") == ["rev@1", "rev-copy@1", "up@1"]
    mirror = Library(tmp_path / "mirror")
    assert mirror.stats()["stored_bytes"] == lib.stats()["stored_bytes"] and mirror.verify() == ([], [])
    assert lib.push(tmp_path / "mirror") == []
    mirror.add(experts["srt"], "srt")
    assert lib.pull(tmp_path / "mirror") == ["srt@1"]
    assert [e.ref for e in lib.experts()] == [e.ref for e in mirror.experts()]
    other = Library.init(tmp_path / "other", base_model.default_base())
    other.add(experts["rev2"], "rev")  # rev@1 with other contents
    with pytest.raises(MoergeError, match="already has rev@1 with other contents"):
        lib.push(other.root)
    foreign = Library.init(tmp_path / "foreign", tiny["base"])
    with pytest.raises(MoergeError, match="is a library of another base"):
        lib.push(foreign.root)
    res = cli("library", "push", str(tmp_path / "mirror2"), "--library", str(lib.root))
    assert res.returncode == 0 and "pushed 4 expert versions" in res.stdout


def test_full_fine_tunes_are_experts_of_kind_full(lib, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    import moerge

    train_expert(tmp_path / "full", task="sort", adapter="none", steps=2, n_train=16, batch_size=8, progress=False)
    ft = load_file(tmp_path / "full" / "model.safetensors")
    base = load_file(base_model.default_base() / "model.safetensors")
    # a fine-tune that left some tensors untouched: only the changed ones are stored
    untouched = "model.norm.weight"
    ft[untouched] = base[untouched].clone()
    save_file(ft, tmp_path / "full" / "model.safetensors", metadata={"format": "pt"})
    entry = lib.add(tmp_path / "full", "sort-full")
    assert entry.kind == "full" and untouched not in lib.tensors("sort-full")
    assert [e.ref for e in lib.experts(kind="dense")] == ["sort-full@1"]  # its earlier name still lists it
    lib.export("sort-full", tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ft.items() if k in got)
    r = {"merge_method": "passthrough", "models": [{"model": "library://sort-full"}]}
    merged = load_file(moerge.merge(r, tmp_path / "m", library=lib.root).out_dir / "model.safetensors")
    assert all(torch.equal(merged[k], ft[k]) for k in merged)
    (tmp_path / "bad").mkdir()
    save_file({"model.norm.weight": torch.ones(3)}, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(MoergeError, match="lacks tensor"):
        lib.add(tmp_path / "bad", "bad")
    with pytest.raises(MoergeError, match="every tensor equals the base's"):
        lib.add(base_model.default_base(), "the-base-itself")


def _damage(lib, ref, how):
    """Damage the blob of one of ``ref``'s tensors that no other tensor shares; returns its key."""
    import sqlite3

    with sqlite3.connect(lib.root / "catalog.sqlite") as db:
        key, blob = db.execute("SELECT key, blob FROM tensors WHERE expert_id = ? AND key LIKE '%lora_A%' AND blob IN "
                               "(SELECT blob FROM tensors GROUP BY blob HAVING COUNT(*) = 1) ORDER BY key LIMIT 1",
                               (lib.get(ref).id,)).fetchone()
    path = lib._blob_path(blob)
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-4:]
    path.write_bytes(bytes(data))
    return key


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_blob_is_refused_wherever_it_is_read(lib, experts, tmp_path, how):
    import re

    import moerge
    from moerge.routing import load_routed

    lib.add(experts["rev"], "rev")
    key = _damage(lib, "rev@1", how)
    what = "sha256 mismatch" if how == "flip" else "bytes instead of"
    line = re.escape(f"rev@1 tensor {key}: its blob ") + r"[0-9a-f]{12} is corrupt \(.*" + re.escape(what) + r".*\); run " \
        + re.escape(f"`moerge library verify`, then re-add the expert (`moerge library add {experts['rev'].resolve()} --name rev` rewrites it)")
    with pytest.raises(MoergeError, match=line):
        lib.load("rev@1")
    with pytest.raises(MoergeError, match=line):
        lib.tensors("rev")
    res = cli("library", "export", "rev@1", str(tmp_path / "out"), "--library", str(lib.root))
    assert res.returncode == 1 and re.search(line, res.stderr) and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base_model.default_base()),
              "models": [{"model": "library://rev@1", "parameters": {"weight": 1.0}}]}
    with pytest.raises(MoergeError, match=line):
        moerge.merge(recipe, tmp_path / "merged", library=lib.root)
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    res = cli("merge", str(tmp_path / "r.yaml"), str(tmp_path / "merged"), "--library", str(lib.root))
    assert res.returncode == 1 and re.search(line, res.stderr) and not (tmp_path / "merged").exists()
    with pytest.raises(MoergeError, match=line):
        load_routed("uniform", library=lib.root)
    with pytest.raises(MoergeError, match=line):  # push never spreads it to another library
        lib.push(tmp_path / "other-lib")
    # the fix the line names: re-adding the expert rewrites the blob; no new version
    res = cli("library", "add", str(experts["rev"]), "--name", "rev", "--library", str(lib.root))
    assert res.returncode == 0, res.stderr
    assert "rev@1: rewrote 1 damaged blob" in res.stderr and "nothing added" in res.stderr and "added rev" not in res.stdout
    assert [e.ref for e in lib.experts()] == ["rev@1"] and lib.verify() == ([], [])
    assert lib.load("rev@1").kind == "lora"


def test_a_damaged_blob_is_rewritten_by_a_new_version_that_shares_it(lib, experts):
    lib.add(experts["rev"], "rev")
    _damage(lib, "rev@1", "flip")
    with pytest.warns(LibraryWarning) as caught:
        assert lib.add(experts["rev"], "rev-copy").ref == "rev-copy@1"
    assert [str(w.message) for w in caught] == ["rev-copy@1: rewrote 1 damaged blob from " + str(experts["rev"]),
                                                f"{experts['rev']}: same tensors as rev@1; added as rev-copy@1 anyway (no new bytes stored)"]
    assert not any(issubclass(w.category, NothingAdded) for w in caught)
    assert lib.verify() == ([], [])


def test_list_refuses_an_unknown_kind_and_says_when_nothing_matches(lib, experts):
    from moerge.experts.card import ADAPTERS

    assert KINDS is ADAPTERS  # one list of kinds
    want = f"unknown expert kind 'lorra' (did you mean lora?); the kinds are {', '.join(KINDS)}"
    with pytest.raises(MoergeError, match=re.escape(want)):
        lib.experts(kind="lorra")
    res = cli("library", "list", "--kind", "lorra", "--library", str(lib.root))
    assert res.returncode == 1 and res.stderr.strip() == f"error: {want}" and res.stdout == ""
    res = cli("library", "list", "--library", str(lib.root))
    assert res.returncode == 0 and res.stdout.strip() == ("the library holds no experts yet; add one with "
                                                          "`moerge library add DIR --name NAME`")
    lib.add(experts["rev"], "rev")
    res = cli("library", "list", "--kind", KINDS[-1], "--tag", "x", "--library", str(lib.root))
    assert res.returncode == 0 and res.stdout.strip() == f"no experts match --tag x --kind {KINDS[-1]}"
    res = cli("library", "list", "--kind", "lora", "--library", str(lib.root))
    assert res.returncode == 0 and "rev@1" in res.stdout


def test_identical_content_is_not_added_twice(lib, experts, tmp_path):
    import shutil
    import warnings

    from moerge.tasks import examples

    lib.add(experts["rev"], "rev")
    size = lib.stats()["stored_bytes"]
    with pytest.raises(MoergeError, match=re.escape(f"{experts['rev']}: identical to rev@1; nothing added")):
        lib.add(experts["rev"], "rev", tags=["other-tags-are-not-content"])
    res = cli("library", "add", str(experts["rev"]), "--name", "rev", "--library", str(lib.root))
    assert res.returncode == 1 and "identical to rev@1; nothing added" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = cli("library", "add", str(experts["rev"]), "--name", "other", "--library", str(lib.root))
    assert res.returncode == 0 and "added other@1" in res.stdout
    assert res.stderr.strip() == f"warning: {experts['rev']}: same tensors as rev@1; added as other@1 anyway (no new bytes stored)"
    assert [e.ref for e in lib.experts()] == ["other@1", "rev@1"] and lib.stats()["stored_bytes"] == size
    # the same tensors with a different card (new task centroids from prompts) are a new version
    with warnings.catch_warnings():
        warnings.simplefilter("error", LibraryWarning)  # an update of rev: no notice about other@1
        assert lib.add(experts["rev"], "rev", prompts=[e.prompt for e in examples("reverse", "train", 16)]).ref == "rev@2"
    assert lib.get("rev@2").card["centroids"] != lib.get("rev@1").card["centroids"]
    # ... and so are the same tensors with another adapter config (the scale alpha / r lives there)
    shutil.copytree(experts["rev"], tmp_path / "alpha")
    cfg = json.loads((tmp_path / "alpha" / "adapter_config.json").read_text())
    (tmp_path / "alpha" / "adapter_config.json").write_text(json.dumps(cfg | {"lora_alpha": cfg["lora_alpha"] * 2}))
    assert lib.add(tmp_path / "alpha", "rev").ref == "rev@3"
    (tmp_path / "alpha" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoergeError, match="identical to rev@1; nothing added"):
        lib.add(tmp_path / "alpha", "rev")


def test_show_summarises_the_card(lib, experts):
    lib.add(experts["rev"], "rev", tags=["a", "b"], contributor="ann", license="mit")
    res = cli("library", "show", "rev@1", "--library", str(lib.root))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    fields = dict(line.split(None, 1) for line in lines if line and not line.startswith(" ") and len(line.split(None, 1)) == 2)
    assert fields["expert"] == "rev@1" and fields["kind"] == "lora" and fields["task"] == "reverse"
    assert fields["tags"] == "a, b" and fields["contributor"] == "ann" and fields["license"] == "mit"
    assert fields["digest"] == lib.get("rev@1").digest and fields["size"].startswith(f"{lib.get('rev@1').nbytes / 1e6:.2f} MB in ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", fields["created"])
    hidden = base_model.CONFIG["hidden"]
    assert f"<8 centroids x {hidden} dims>" in res.stdout and f"<{hidden} dims>" in res.stdout
    assert len(lines) < 60 and "--json" in lines[-1]
    full = json.loads(cli("library", "show", "rev@1", "--json", "--library", str(lib.root)).stdout)
    assert len(full["card"]["centroids"]) == 8 and len(full["card"]["centroids"][0]) == hidden and full["ref"] == "rev@1"


def test_routing_hints_for_library_experts_without_centroids_or_gates(lib, experts, tmp_path):
    """A library expert lacking task centroids or PHATGOOSE gates is told how to get them into the
    library copy (no retraining), and following the hint works."""
    import shutil

    from moerge.routing import load_routed
    from moerge.tasks import examples, write_jsonl

    hub = tmp_path / "hub"  # an adapter without an expert card: no centroids, no gates
    shutil.copytree(experts["rev"], hub, ignore=shutil.ignore_patterns("expert.json", "gates.safetensors"))
    with pytest.raises(MoergeError, match=re.escape(f"expert hub has no task centroids; record them with `moerge expert embed {hub}`")
                       + ".*no retraining needed"):
        load_routed("centroid", experts=[hub])
    lib.add(hub, "rev", task="reverse")
    src = hub.resolve()
    with pytest.raises(MoergeError, match=re.escape(
            f"expert rev@1 has no task centroids in its library card; re-add it with its task's prompts: `moerge library add "
            f"{src} --name rev --prompts FILE`, or `moerge expert embed {src} --prompts FILE` then `moerge library add {src} --name rev`")):
        load_routed("centroid", library=lib.root)
    res = cli("route", "eval", "--router", "smear", "--library", str(lib.root), "--tasks", "reverse", "--n", "2")
    assert res.returncode == 1 and "re-add it with its task's prompts" in res.stderr and "retrain" not in res.stderr
    with pytest.raises(MoergeError, match=re.escape(
            f"expert rev@1 has no gates in the library; train them on the folder it was added from, then add it again: "
            f"`moerge expert gate {src} --data FILE` (examples of its task), then `moerge library add {src} --name rev`")):
        load_routed("phatgoose", library=lib.root, top_k=1)
    # following the hints: re-add with prompts, then gate the folder and add it again
    (tmp_path / "p.txt").write_text("\n".join(e.prompt for e in examples("reverse", "train", 32)))
    res = cli("library", "add", str(hub), "--name", "rev", "--task", "reverse", "--prompts", str(tmp_path / "p.txt"),
              "--library", str(lib.root))
    assert res.returncode == 0 and "added rev@2" in res.stdout, res.stderr
    assert load_routed("centroid", library=lib.root).names == ["rev@2"]
    write_jsonl(tmp_path / "rows.jsonl", examples("reverse", "train", 16))
    res = cli("expert", "gate", str(hub), "--data", str(tmp_path / "rows.jsonl"), "--steps", "2")
    assert res.returncode == 0, res.stderr
    res = cli("library", "add", str(hub), "--name", "rev", "--task", "reverse", "--library", str(lib.root))
    assert res.returncode == 0 and "added rev@3" in res.stdout, res.stderr
    assert load_routed("phatgoose", library=lib.root, top_k=1).names == ["rev@3"]
