"""The expert library: versions, dedup, export round-trips, refusals, concurrency, crashes, corruption."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moerge import base as base_model
from moerge.errors import MoergeError
from moerge.library import Library
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
    b = lib.add(experts["rev"], "reverse-expert")  # the same adapter again: a new version, no new bytes
    assert (a.ref, b.ref) == ("reverse-expert@1", "reverse-expert@2")
    assert lib.stats()["stored_bytes"] == size and a.digest == b.digest
    lib.add(experts["srt"], "sort-expert")
    lib.add(experts["up"], "upper-expert")
    assert a.task == "reverse" and a.card["base_fingerprint"] == lib.meta["base_fingerprint"] and a.license == "mit"
    assert [e.ref for e in lib.experts(task="reverse")] == ["reverse-expert@1", "reverse-expert@2"]
    assert [e.kind for e in lib.experts(latest=True)] == ["lora", "dora", "ia3"]
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
    with pytest.raises(MoergeError, match="was it made for another base"):
        lib.add(tmp_path / "other", "other")
    forged = tmp_path / "forged"
    forged.mkdir()
    for f in experts["rev"].iterdir():
        (forged / f.name).write_bytes(f.read_bytes())
    card = json.loads((forged / "expert.json").read_text()) | {"base_fingerprint": "sha256:0000"}
    (forged / "expert.json").write_text(json.dumps(card))
    with pytest.raises(MoergeError, match="was trained on a base with fingerprint sha256:0000"):
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
    assert json.loads(cli("library", "show", "r@1", "--library", str(lib.root)).stdout)["tags"] == ["a", "b"]
    assert cli("library", "export", "r", str(tmp_path / "e"), "--library", str(lib.root)).returncode == 0
    assert lib.remove("r") == ["r@1"]
    assert lib.gc(min_age_seconds=0) > 0 and lib.stats()["blobs"] == 0
    res = cli("library", "rm", "r", "--library", str(lib.root))
    assert res.returncode == 1 and "no expert 'r'" in res.stderr
    res = cli("library", "list", "--library", str(tmp_path))
    assert res.returncode == 1 and "not an expert library" in res.stderr


def test_recipes_name_library_experts(lib, experts, tmp_path):
    import moerge
    from safetensors.torch import load_file

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
    lib.add(experts["rev"], "rev")  # rev@2: same blobs
    lib.add(experts["up"], "up")
    assert lib.push(tmp_path / "mirror") == ["rev@1", "rev@2", "up@1"]
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


def test_full_fine_tunes_are_dense_experts(lib, tmp_path):
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
    assert entry.kind == "dense" and untouched not in lib.tensors("sort-full")
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
