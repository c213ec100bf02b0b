import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moerge.errors import MoergeError
from moerge.io.hub import resolve, snapshot_commit
from moerge.io.source import open_source
from moerge.io.writer import ShardedWriter, parse_size


def test_source_reads_headers_then_exact_tensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.tensor([True, False]),
        "e": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    src = open_source(tmp_path)
    assert sorted(src.names()) == sorted(tensors)
    assert src.info("b").dtype == torch.bfloat16 and src.info("b").shape == (5,)
    for k, v in tensors.items():
        assert torch.equal(src.get(k), v)


def test_sharded_folder_with_index(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    src = open_source(tmp_path)
    assert torch.equal(src.get("y"), torch.zeros(3))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(MoergeError, match="missing"):
        open_source(tmp_path)


@pytest.mark.parametrize("cut", [4, 20, -1])
def test_truncated_safetensors_is_refused_naming_the_file(tmp_path, cut):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(MoergeError, match=r"model\.safetensors: not a valid safetensors file"):
        open_source(tmp_path)


def test_garbage_header_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 10)
    with pytest.raises(MoergeError, match="header is not JSON"):
        open_source(tmp_path / "model.safetensors")


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(MoergeError, match="no such file or folder"):
        open_source(tmp_path / "nope")
    with pytest.raises(MoergeError, match="no model.safetensors"):
        open_source(tmp_path)


def test_bin_checkpoint_is_loaded_weights_only(tmp_path):
    sd = {"w": torch.randn(3, 3), "b": torch.randn(3)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    src = open_source(tmp_path)
    assert torch.equal(src.get("w"), sd["w"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"w": Evil()}, tmp_path / "evil.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(MoergeError, match="weights-only"):
        open_source(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned").exists()


def test_writer_out_of_order_shards_and_index(tmp_path):
    tensors = {f"t{i}": torch.randn(100, 10).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(6)}
    w = ShardedWriter(tmp_path / "out", [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], max_shard_bytes=5000)
    assert len(w.files) > 1
    assert not (tmp_path / "out").exists()
    for k in reversed(list(tensors)):
        w.write(k, tensors[k])
    w.commit()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for f in set(index["weight_map"].values()):
        with safe_open(tmp_path / "out" / f, "pt") as fh:  # the reference reader accepts our files
            for k in fh.keys():
                assert torch.equal(fh.get_tensor(k), tensors[k])
    assert not list(tmp_path.glob(".out.*"))


def test_writer_refuses_existing_and_abort_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(MoergeError, match="already exists"):
        ShardedWriter(tmp_path / "out", [("a", (1,), torch.float32)])
    w = ShardedWriter(tmp_path / "new", [("a", (1,), torch.float32), ("b", (2,), torch.float32)])
    w.write("a", torch.ones(1))
    with pytest.raises(RuntimeError, match="never written"):
        w.commit()
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    w = ShardedWriter(out, [("a", (2,), torch.float32)], overwrite=True)
    assert (out / "keep.txt").exists()  # untouched until commit
    w.write("a", torch.ones(2))
    w.commit()
    assert not (out / "keep.txt").exists()
    assert torch.equal(load_file(out / "model.safetensors")["a"], torch.ones(2))


def test_parse_size():
    assert parse_size("5B") == 5_000_000_000
    assert parse_size("500M") == 500_000_000
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("1234") == 1234
    with pytest.raises(MoergeError, match="shard size"):
        parse_size("lots")


@pytest.mark.parametrize("text, size", [
    ("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("10KB", 10 * 10**3), ("2TB", 2 * 10**12),  # transformers: powers of 1000
    ("5GiB", 5 * 2**30), ("500MiB", 500 * 2**20), ("10KiB", 10 * 2**10), ("1.5GiB", 3 * 2**29),  # powers of 1024
    ("500mb", 500 * 10**6), ("5gib", 5 * 2**30), ("10kb", 10**4), ("5 GB", 5 * 10**9),  # any case, a space
    ("5B", 5 * 10**9), ("5b", 5 * 10**9), ("2g", 2 * 10**9), ("500M", 500 * 10**6), ("7K", 7000),  # mergekit's forms
    (1234, 1234), ("1234", 1234), (" 99 ", 99), ("0.5KB", 500),
])
def test_parse_size_takes_transformers_max_shard_size_spellings(text, size):
    assert parse_size(text) == size
    from transformers.utils.hub import convert_file_size_to_int

    if isinstance(text, str) and text[-2:] in ("MB", "GB", "KB", "iB") and text.rstrip("KMGTiB").isdigit():
        assert parse_size(text) == convert_file_size_to_int(text)


@pytest.mark.parametrize("text", ["lots", "5XB", "5 G B", "", "-5", "1e9", "5GiBs", 0, "0", "0.0001KB", True, -3])
def test_bad_shard_size_is_one_line_listing_the_forms(text):
    with pytest.raises(MoergeError) as e:
        parse_size(text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"shard size {text!r}")
    for form in ("5B", "500M", "500MB", "5GB", "500MiB", "5GiB"):
        assert form in msg


def test_cli_merge_takes_transformers_shard_size(tiny, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from moerge.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tiny["ft1"]), "parameters": {"weight": 1.0}}, {"model": str(tiny["ft2"]), "parameters": {"weight": 1.0}}]}))
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--out-shard-size", "20KiB", "-q"])
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    sizes = [f.stat().st_size for f in (tmp_path / "out").glob("model-*.safetensors")]
    assert len(set(index["weight_map"].values())) == len(sizes) > 1
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out2"), "--out-shard-size", "5 GB B", "-q"])
    assert res.exit_code == 1 and "shard size '5 GB B'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out2").exists()


def test_missing_paths_say_the_path_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ("./nope", "../nope/x", str(tmp_path / "nope"), "nope", "~/surely-no-such-model", "~nosuchuserxyz/m",
                "x" * 5000, "a/b/c"):
        with pytest.raises(MoergeError) as e:
            resolve(ref)
        assert str(e.value).endswith(": no such file or folder; check the path"), str(e.value)
        assert "\n" not in str(e.value)


def test_missing_hub_id_offline_says_no_local_folder_and_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for ref, rev in (("org/name", None), ("org/name", "v2")):
        with pytest.raises(MoergeError) as e:
            resolve(ref, rev)
        msg = str(e.value)
        assert msg.startswith(f"{ref}{'@' + rev if rev else ''}: no such local folder, and hub model") and "\n" not in msg
        assert "not in the local hub cache (HF_HUB_OFFLINE is set)" in msg and f"hf download {ref}" in msg


def test_adapter_folder_is_not_opened_as_a_model(tmp_path):
    from moerge.io.source import adapter_folder

    save_file({"base_model.model.x.lora_A.weight": torch.ones(2, 2)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert adapter_folder(tmp_path) == tmp_path and adapter_folder(tmp_path / "adapter_model.safetensors") == tmp_path
    with pytest.raises(MoergeError, match=r"is a PEFT adapter folder \(adapter_config.json\), not a model; .*BASE\+path/to/adapter"):
        open_source(tmp_path)
    assert open_source(tmp_path / "adapter_model.safetensors").names()  # the adapter's own file still opens (read_adapter)
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")  # a model folder that also carries an adapter config
    assert adapter_folder(tmp_path) is None and open_source(tmp_path).names() == ["w"]


def test_hub_id_resolves_from_local_cache_offline(tmp_path, monkeypatch):
    """The real huggingface_hub code path, against a cache laid out as the hub client writes it."""
    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, snap / "model.safetensors")
    (snap / "config.json").write_text("{}")
    (cache / "models--someorg--tiny" / "refs").mkdir()
    (cache / "models--someorg--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    folder = resolve("someorg/tiny")
    assert folder == snap
    assert torch.equal(open_source(folder).get("w"), torch.ones(2))
    with pytest.raises(MoergeError, match="HF_HUB_OFFLINE"):
        resolve("someorg/absent")
    with pytest.raises(MoergeError, match=r"no/such/dir: no such file or folder; check the path$"):
        resolve(str(tmp_path / "no" / "such" / "dir"))
    assert snapshot_commit("someorg/tiny", folder) == "a" * 40  # what a saved recipe pins
    assert snapshot_commit(str(snap), snap) is None  # a path into the cache, given as a path, stays a path


# ------------------------------------------------------------------------ io.remote: shared transfers
def test_remote_writes_whole_files_and_says_what_went_wrong(tmp_path):
    from moerge.io.remote import open_remote

    r = open_remote(tmp_path / "share")
    assert r.local and r.size(r.path("objects", "ab", "cd")) is None and r.find(r.path("objects")) == {}
    r.write(r.path("objects", "ab", "cd"), b"12345", "object abcd")
    (tmp_path / "src.bin").write_bytes(b"xyz")
    r.put(tmp_path / "src.bin", r.path("blobs", "x"))
    assert r.read(r.path("objects", "ab", "cd")) == b"12345" and r.size(r.path("blobs", "x")) == 3
    assert sorted(p.rsplit("/", 1)[1] for p in r.find(r.root)) == ["cd", "x"]  # no temporary files left behind
    with pytest.raises(MoergeError, match="cannot read object ffff"):
        r.read(r.path("objects", "ff", "ff"), "object ffff")
    with pytest.raises(MoergeError, match="no such library location"):
        open_remote(tmp_path / "nowhere", must_exist=True, what="library location")
    with pytest.raises(MoergeError, match="cannot open this remote"):
        open_remote("nosuchprotocol://bucket/x")
    with pytest.raises(MoergeError, match="the remote is empty"):
        open_remote(" ")
