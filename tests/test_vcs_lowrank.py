"""Checkpoints that differ from their parent by a LoRA, kept in git as the factors: exact rebuilds,
real git and PEFT, sharing, gc and damage."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moerge.cli import app
from moerge.vcs import lowrank
from moerge.vcs.repo import install, objects

runner = CliRunner()
CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def git(repo, *args):
    r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
    return r.stdout


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("transpose", [False, True])
def test_a_merged_lora_is_rebuilt_bit_for_bit_from_its_factors(dtype, transpose):
    g = torch.Generator().manual_seed(0)
    out_, in_, r = 96, 128, 4
    w = torch.randn((in_, out_) if transpose else (out_, in_), generator=g).to(dtype)
    a, b = torch.randn(r, in_, generator=g) * 0.1, torch.randn(out_, r, generator=g) * 0.1
    work = torch.float64 if dtype == torch.float64 else torch.float32
    d = (b.to(work) @ a.to(work)) * 2.0  # the way PEFT and moerge merge: one matmul, added, cast once
    merged = (w.to(work) + (d.T if transpose else d)).to(dtype)
    assert not torch.equal(merged, w)
    obj = lowrank.encode("p" * 64, raw(w), raw(merged), CODES[dtype], tuple(w.shape), a.numpy(), b.numpy(), 2.0, transpose)
    assert lowrank.decode(obj, raw(w)) == raw(merged)
    # the factors and a small residual (float32 matmul rounding differs from the exact rebuild in a few
    # last bits at most) take far less than the dense tensor
    assert len(obj) < 0.5 * len(raw(merged)), (len(obj), len(raw(merged)))
    head = lowrank.header(obj)
    assert head["rank"] == r and head["parent"] == "p" * 64 and head["nbytes"] == len(raw(merged))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["F32", "BF16", "F16", "F64"]), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3),
       st.randoms(use_true_random=False))
def test_any_target_bytes_round_trip_exactly(dtype, rows, cols, r, rnd):
    """Whatever the target (NaNs, infinities, sign flips, bits the factors cannot explain), parent +
    factors + residual give exactly its bytes."""
    size = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}[dtype]
    parent = bytes(rnd.getrandbits(8) for _ in range(rows * cols * size))
    target = bytes(rnd.getrandbits(8) for _ in range(rows * cols * size))
    a = np.array([[rnd.uniform(-3, 3) for _ in range(cols)] for _ in range(r)], dtype=np.float32)
    b = np.array([[rnd.uniform(-3, 3) for _ in range(r)] for _ in range(rows)], dtype=np.float32)
    with np.errstate(all="ignore"):
        obj = lowrank.encode("0" * 64, parent, target, dtype, (rows, cols), a, b, rnd.uniform(-2, 2), False)
        assert lowrank.decode(obj, parent) == target


def test_damaged_objects_and_wrong_factors_are_refused():
    w = torch.randn(8, 8)
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    obj = lowrank.encode("0" * 64, raw(w), raw(w + b @ a), "F32", (8, 8), a.numpy(), b.numpy(), 1.0, False)
    with pytest.raises(lowrank.LowRankError, match="header or length"):
        lowrank.decode(obj[:-3], raw(w))
    with pytest.raises(lowrank.LowRankError, match="another size"):
        lowrank.decode(obj, raw(w)[:-4])
    with pytest.raises(lowrank.LowRankError, match="do not make"):
        lowrank.encode("0" * 64, raw(w), raw(w), "F32", (8, 8), a[:, :4].numpy(), b.numpy(), 1.0, False)
    with pytest.raises(lowrank.LowRankError, match="floating-point"):
        lowrank.encode("0" * 64, raw(w), raw(w), "I64", (8, 4), a.numpy(), b.numpy(), 1.0, False)


@pytest.fixture()
def lora_repo(tiny, repo, tmp_path):
    """A repo with the tiny base committed, a PEFT LoRA of it, and the base with the LoRA merged (PEFT's
    merge_and_unload) written over the committed file, not yet staged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shutil.copy(tiny["base"] / "model.safetensors", repo / "model.safetensors")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    merged = peft.merge_and_unload()
    sd = {k: v.contiguous() for k, v in merged.state_dict().items() if k in load_file(repo / "model.safetensors")}
    save_file(sd, repo / "model.safetensors", metadata={"format": "pt"})
    return repo, adapter


def test_git_add_with_lora_keeps_factors_and_checkout_is_exact(lora_repo, tiny, tmp_path, monkeypatch):
    repo, adapter = lora_repo
    merged = (repo / "model.safetensors").read_bytes()
    monkeypatch.chdir(repo)  # paths are relative to the current folder, as for git add
    res = runner.invoke(app, ["git", "add", "model.safetensors", "--lora", str(adapter)])
    monkeypatch.chdir(tmp_path)
    assert res.exit_code == 0, res.output
    store = objects(repo)
    n_linear = 3 * 7  # q k v o gate up down in each of 3 layers
    assert f"{n_linear} tensor(s) kept as factors" in res.output and "x smaller" in res.output
    assert len(store.delta_digests()) == n_linear
    assert git(repo, "status", "--porcelain") == "M  model.safetensors\n"
    git(repo, "commit", "-qm", "lora merged")
    # checkout rebuilds the exact bytes from the factors; the old revision still checks out
    (repo / "model.safetensors").unlink()
    git(repo, "checkout", "--", "model.safetensors")
    assert (repo / "model.safetensors").read_bytes() == merged
    git(repo, "checkout", "-q", "HEAD~1")
    assert (repo / "model.safetensors").read_bytes() == (tiny["base"] / "model.safetensors").read_bytes()
    git(repo, "checkout", "-q", "main")
    assert (repo / "model.safetensors").read_bytes() == merged
    assert runner.invoke(app, ["git", "verify", "--repo", str(repo)]).exit_code == 0

    # shared through a remote: the deltas travel as deltas and rebuild exactly in the clone
    remote = str(tmp_path / "shared")
    res = runner.invoke(app, ["git", "push", remote, "--repo", str(repo)])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "shared" / "objects").rglob("*.lr"))) == n_linear
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    install(clone)
    res = runner.invoke(app, ["git", "pull", remote, "--repo", str(clone)])
    assert res.exit_code == 0, res.output
    assert (clone / "model.safetensors").read_bytes() == merged
    assert len(objects(clone).delta_digests()) == n_linear

    # gc keeps what deltas are built on, even when no commit names it any more
    git(repo, "checkout", "-q", "--orphan", "flat")
    git(repo, "commit", "-qm", "history squashed")
    git(repo, "branch", "-D", "main")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    res = runner.invoke(app, ["git", "gc", "--min-age", "0", "--repo", str(repo)])
    assert res.exit_code == 0, res.output
    (repo / "model.safetensors").unlink()
    git(repo, "checkout", "--", "model.safetensors")
    assert (repo / "model.safetensors").read_bytes() == merged

    # a damaged delta stops the checkout naming the tensor, and verify reports it
    victim = sorted((repo / ".git" / "moerge" / "objects").rglob("*.lr"))[0]
    data = bytearray(victim.read_bytes())
    data[lowrank.header(bytes(data))["_data"] + 3] ^= 0x40  # an exponent bit of the first number of A
    victim.write_bytes(bytes(data))
    (repo / "model.safetensors").unlink()
    r = subprocess.run(["git", "checkout", "--", "model.safetensors"], cwd=repo, capture_output=True, text=True)
    assert r.returncode != 0 and "tensor model.layers." in r.stderr and "moerge git pull" in r.stderr
    assert "does not match its sha256" in r.stderr and "Traceback" not in r.stderr
    assert not victim.exists()  # moved aside: a pull fetches it again
    res = runner.invoke(app, ["git", "pull", remote, "--repo", str(repo)])
    assert res.exit_code == 0 and "fetched 1 object(s)" in res.output, res.output
    git(repo, "checkout", "--", "model.safetensors")  # as the error said
    assert (repo / "model.safetensors").read_bytes() == merged
    assert runner.invoke(app, ["git", "verify", "--repo", str(repo)]).exit_code == 0


def test_git_add_with_lora_after_git_status_still_keeps_factors(lora_repo):
    """`git status` runs the clean filter, which stores the changed tensors dense: the LoRA add then
    replaces those copies by their factors instead of skipping them."""
    repo, adapter = lora_repo
    git(repo, "status", "--porcelain")
    res = runner.invoke(app, ["git", "add", str(repo / "model.safetensors"), "--lora", str(adapter), "--repo", str(repo)])
    assert res.exit_code == 0, res.output
    assert "21 tensor(s) kept as factors" in res.output and len(objects(repo).delta_digests()) == 21


def test_git_add_with_lora_refuses_bad_input(lora_repo, tiny, tmp_path):
    repo, adapter = lora_repo

    def add(*args):
        return runner.invoke(app, ["git", "add", *args, "--repo", str(repo)])

    f = str(repo / "model.safetensors")
    res = add(f, "--lora", str(tmp_path / "nope"))
    assert res.exit_code == 1 and "--lora " in res.output and "nope: no such folder" in res.output
    (tmp_path / "empty").mkdir()
    res = add(f, "--lora", str(tmp_path / "empty"))
    assert res.exit_code == 1 and "not a PEFT adapter folder" in res.output
    whole = (repo / "model.safetensors").read_bytes()
    (repo / "model.safetensors").write_bytes(whole[:-100])  # the committed checkpoint, truncated: named, one line
    res = add(f, "--lora", str(adapter))
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "model.safetensors: " in res.output
    assert "truncated" in res.output or "ends inside" in res.output
    (repo / "model.safetensors").write_bytes(whole)
    res = add(str(repo / "missing.safetensors"), "--lora", str(adapter))
    assert res.exit_code == 1 and "no such file" in res.output
    (repo / "new.safetensors").write_bytes((repo / "model.safetensors").read_bytes())
    res = add(str(repo / "new.safetensors"), "--lora", str(adapter))
    assert res.exit_code == 1 and "not committed as a moerge checkpoint at HEAD" in res.output
    (repo / "notes.bin").write_bytes(b"x")
    res = add(str(repo / "notes.bin"), "--lora", str(adapter))
    assert res.exit_code == 1 and "not tracked by moerge" in res.output
    # an adapter of another model: its shapes do not fit the committed checkpoint
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moerge.lm.tiny import make_base

    other = make_base(tmp_path / "other", seed=1, hidden=48, layers=3, intermediate=64)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules="all-linear"))
    peft.save_pretrained(tmp_path / "other-adapter")
    res = add(f, "--lora", str(tmp_path / "other-adapter"))
    assert res.exit_code == 1 and "another base" in res.output and "Traceback" not in res.output
    # an adapter that does not explain the change: nothing kept as factors, the file still staged dense
    unrelated = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["base"]),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    unrelated.save_pretrained(tmp_path / "unrelated")
    res = add(f, "--lora", str(tmp_path / "unrelated"))
    assert res.exit_code == 0 and "0 tensor(s) kept as factors" in res.output and "kept dense" in res.output
    assert objects(repo).delta_digests() == set()
    assert git(repo, "status", "--porcelain").splitlines()[0] == "M  model.safetensors"
    # a relative FILE is the repository's (as `git -C DIR add FILE`), wherever the command runs
    res = add("model.safetensors", "--lora", str(tmp_path / "unrelated"))
    assert res.exit_code == 0 and "staged model.safetensors" in res.output, res.output
    res = add("missing.safetensors", "--lora", str(adapter))
    assert res.exit_code == 1 and f"missing.safetensors: no such file in {repo}" in res.output.replace("\n", "")


def test_git_add_with_a_library_expert(lora_repo, tiny, tmp_path):
    from moerge.library import Library

    repo, adapter = lora_repo
    lib = Library.init(tmp_path / "lib", tiny["base"])
    lib.add(adapter, "merged-in")
    res = runner.invoke(app, ["git", "add", str(repo / "model.safetensors"), "--lora", "library://merged-in",
                              "--library", str(tmp_path / "lib"), "--repo", str(repo)])
    assert res.exit_code == 0 and "21 tensor(s) kept as factors" in res.output, res.output
    res = runner.invoke(app, ["git", "add", str(repo / "model.safetensors"), "--lora", "library://merged-in",
                              "--library", str(tmp_path / "lib"), "--repo", str(repo)])
    assert "0 tensor(s) kept as factors" in res.output and "21 more were kept as factors by an earlier add" in res.output
    res = runner.invoke(app, ["git", "add", str(repo / "model.safetensors"), "--lora", "library://nosuch",
                              "--library", str(tmp_path / "lib"), "--repo", str(repo)])
    assert res.exit_code == 1 and "no expert 'nosuch'" in res.output
