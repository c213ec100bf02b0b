"""Version control of checkpoints in real git: filters, diff, merge driver, object sharing (folder, S3)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moerge.cli import app
from moerge.vcs import manifest as mf
from moerge.vcs.repo import install, objects, track

runner = CliRunner()


def git(repo, *args, check=True):
    r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"git {' '.join(args)}: {r.stderr}")
    return r


def checkpoint(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(32, generator=g).to(torch.float16),
        "d.count": torch.arange(10, dtype=torch.int64),
        "e.flags": torch.tensor([True, False, True]),
    }


def commit(repo, sd, msg, name="model.safetensors", meta=None):
    save_file(sd, repo / name, metadata=meta or {"format": "pt"})
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", msg)


def test_commit_stores_manifests_and_checkout_is_bit_identical(repo, tmp_path):
    sd = checkpoint()
    meta = {"format": "pt"}  # one key: safetensors writes several metadata keys in a random order
    commit(repo, sd, "v1", meta=meta)
    v1 = (repo / "model.safetensors").read_bytes()
    stored = git(repo, "show", "HEAD:model.safetensors").stdout
    m = mf.parse(stored)
    assert stored.startswith(mf.MAGIC) and len(stored) < 2000 and m.size == len(v1)
    assert {p.name: (p.dtype, p.shape) for p in m.parts if p.kind == "tensor"} == {
        "a.weight": ("F32", (64, 32)), "b.weight": ("BF16", (32, 32)), "c.bias": ("F16", (32,)), "d.count": ("I64", (10,)),
        "e.flags": ("BOOL", (3,))}
    store = objects(repo)
    n1 = len(store.digests())
    # a new version changing one tensor stores that tensor only
    sd["a.weight"][0, 0] += 1
    commit(repo, sd, "v2", meta=meta)
    assert len(store.digests()) == n1 + 1
    new_bytes = sum(store.size(d) for d in store.digests()) - sum(p.nbytes for p in {p.digest: p for p in m.parts}.values())
    assert new_bytes == 64 * 32 * 4
    # checking out the old revision gives the file back byte for byte
    git(repo, "checkout", "-q", "HEAD~1", "--", "model.safetensors")
    assert (repo / "model.safetensors").read_bytes() == v1
    assert load_file(repo / "model.safetensors")["b.weight"].dtype == torch.bfloat16
    git(repo, "checkout", "-q", "HEAD", "--", "model.safetensors")
    assert git(repo, "status", "--porcelain").stdout == ""


def test_diff_reports_per_tensor_changes(repo):
    sd = checkpoint()
    commit(repo, sd, "v1")
    old = sd["a.weight"].clone()
    sd["a.weight"][:2] *= 1.5
    sd["c.bias"] = torch.zeros(40, dtype=torch.float16)  # reshaped
    sd["f.new"] = torch.ones(3)
    del sd["e.flags"]
    save_file(sd, repo / "model.safetensors")
    out = git(repo, "diff").stdout
    delta = sd["a.weight"] - old
    rel = float(delta.norm() / old.norm())
    line = next(ln for ln in out.splitlines() if "a.weight" in ln)
    assert "changed" in line and f"rel L2 {rel:.3g}" in line and "entries changed 3.1%" in line
    assert f"max |d| {float(delta.abs().max()):.3g}" in line
    assert "reshaped  c.bias  F16 [32] -> F16 [40]" in out and "added     f.new" in out and "removed   e.flags" in out
    assert "summary: 1 of 4 tensors changed" in out and "1 added, 1 removed, 1 reshaped" in out
    git(repo, "commit", "-qam", "v2")
    log = git(repo, "log", "-p", "-1").stdout  # textconv: one line per tensor in git's own diff
    assert "+f.new  F32 [3]" in log and "-e.flags  BOOL [3]" in log
    assert "rel L2" in git(repo, "log", "-p", "-1", "--ext-diff").stdout
    assert git(repo, "diff", "HEAD~1", "HEAD", "--stat").returncode == 0


def _branches(repo, ours, theirs):
    """main changes per ``ours``, branch 'feat' per ``theirs`` (both from v1); returns v1's tensors."""
    base = checkpoint()
    commit(repo, base, "v1")
    git(repo, "checkout", "-qb", "feat")
    sd = {k: v.clone() for k, v in base.items()}
    theirs(sd)
    commit(repo, sd, "feat")
    git(repo, "checkout", "-q", "main")
    sd = {k: v.clone() for k, v in base.items()}
    ours(sd)
    commit(repo, sd, "main")
    return base


def test_merge_takes_one_sided_changes_and_averages_two_sided_ones(repo):
    def ours(sd):
        sd["a.weight"] += 1.0
        sd["c.bias"] += 1

    def theirs(sd):
        sd["a.weight"] += 3.0
        sd["b.weight"] += 2

    base = _branches(repo, ours, theirs)
    r = git(repo, "merge", "feat", "-m", "merge")
    assert "moerge: merged model.safetensors (average): 2 unchanged, 1 ours, 1 theirs, 1 merged" in r.stderr
    got = load_file(repo / "model.safetensors")
    torch.testing.assert_close(got["a.weight"], base["a.weight"] + 2.0)  # O + (1 + 3) / 2
    assert torch.equal(got["b.weight"], base["b.weight"] + 2) and torch.equal(got["c.bias"], base["c.bias"] + 1)
    assert torch.equal(got["d.count"], base["d.count"]) and got["b.weight"].dtype == torch.bfloat16
    assert git(repo, "status", "--porcelain").stdout == ""


def test_merge_method_by_config_and_attribute(repo):
    def ours(sd):
        sd["a.weight"] += 1.0

    def theirs(sd):
        sd["a.weight"] += 3.0

    base = _branches(repo, ours, theirs)
    git(repo, "config", "moerge.merge.method", "sum")
    git(repo, "merge", "feat", "-m", "merge")
    torch.testing.assert_close(load_file(repo / "model.safetensors")["a.weight"], base["a.weight"] + 4.0)
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    with open(repo / ".gitattributes", "a") as f:
        f.write("model.safetensors moerge-merge=theirs\n")
    git(repo, "commit", "-qam", "attr")
    git(repo, "merge", "feat", "-m", "merge2")
    torch.testing.assert_close(load_file(repo / "model.safetensors")["a.weight"], base["a.weight"] + 3.0)


def test_shape_conflict_is_reported_and_keeps_our_side(repo):
    def ours(sd):
        sd["a.weight"] += 1.0

    def theirs(sd):
        sd["a.weight"] = torch.zeros(65, 32)

    _branches(repo, ours, theirs)
    r = git(repo, "merge", "feat", "-m", "merge", check=False)
    assert r.returncode != 0
    assert "moerge: conflict: model.safetensors: tensor a.weight: shape conflict" in r.stderr
    assert "CONFLICT" in r.stdout
    assert load_file(repo / "model.safetensors")["a.weight"].shape == (64, 32)


def test_missing_and_tampered_objects_stop_checkout_naming_the_tensor(repo):
    commit(repo, checkpoint(), "v1")
    store = objects(repo)
    m = mf.parse(git(repo, "show", "HEAD:model.safetensors").stdout)
    target = next(p for p in m.parts if p.name == "b.weight")
    path = store.path(target.digest)
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    (repo / "model.safetensors").unlink()
    r = git(repo, "checkout", "--", "model.safetensors", check=False)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("moerge:")]
    assert len(err) == 1 and "tensor b.weight" in err[0] and "corrupt (sha256 mismatch)" in err[0]
    path.unlink(missing_ok=True)  # moved aside by the smudge already
    r = git(repo, "checkout", "--", "model.safetensors", check=False)
    assert r.returncode != 0 and "tensor b.weight: object" in r.stderr and "is missing" in r.stderr
    assert "moerge git pull REMOTE" in r.stderr
    res = runner.invoke(app, ["git", "verify", "--repo", str(repo)])
    assert res.exit_code == 1 and "model.safetensors: tensor b.weight: object" in res.output


def test_truncated_input_to_clean_leaves_the_store_consistent(repo, tmp_path):
    save_file(checkpoint(), tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    r = subprocess.run([sys.executable, "-m", "moerge.vcs.filter", "clean", "x.safetensors"], cwd=repo,
                       input=data[: len(data) - 100], capture_output=True)
    assert r.returncode == 1 and b"truncated" in r.stderr and r.stderr.count(b"\n") == 1
    store = objects(repo)
    assert all(store.check(d) is None for d in store.digests())  # only complete objects
    assert not store.tmp.exists() or not list(store.tmp.iterdir())  # no temporary files left


def test_non_safetensors_content_round_trips_and_broken_checkpoints_are_refused(repo, tmp_path):
    track(["*.bin"], repo)
    (repo / "weird.bin").write_bytes(b"not a checkpoint at all\x00\x01" * 1000)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "raw")
    assert git(repo, "show", "HEAD:weird.bin").stdout.startswith(mf.MAGIC)
    (repo / "weird.bin").unlink()
    git(repo, "checkout", "--", "weird.bin")
    assert (repo / "weird.bin").read_bytes() == b"not a checkpoint at all\x00\x01" * 1000
    # a .safetensors file that is empty or cut inside its header is refused, not stored as bytes
    save_file(checkpoint(), tmp_path / "good.safetensors")
    good = (tmp_path / "good.safetensors").read_bytes()
    for n in (0, 5, 8, 100):
        (repo / "broken.safetensors").write_bytes(good[:n])
        r = git(repo, "add", "broken.safetensors", check=False)
        assert r.returncode != 0 and "broken.safetensors: is not a readable safetensors file" in r.stderr, n
    (repo / "broken.safetensors").unlink()
    # a tensor name holding a newline cannot be a manifest line: refused at add, so nothing unreadable is committed
    save_file({"x\ny": torch.zeros(2), "ok": torch.ones(2)}, repo / "names.safetensors")
    r = git(repo, "add", "names.safetensors", check=False)
    assert r.returncode != 0 and "its name holds a newline" in r.stderr
    save_file({"a b\tc\rd\x85e": torch.zeros(2)}, repo / "names.safetensors")  # other odd names round-trip
    data = (repo / "names.safetensors").read_bytes()
    git(repo, "add", "names.safetensors")
    git(repo, "commit", "-qm", "names")
    (repo / "names.safetensors").unlink()
    git(repo, "checkout", "--", "names.safetensors")
    assert (repo / "names.safetensors").read_bytes() == data


def _clone_and_pull(repo, tmp_path, remote, env=None):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert (clone / "model.safetensors").read_bytes().startswith(mf.MAGIC.encode())  # no drivers yet: the manifest
    assert runner.invoke(app, ["git", "install", "--repo", str(clone)]).exit_code == 0
    res = runner.invoke(app, ["git", "pull", remote, "--repo", str(clone)], env=env)
    assert res.exit_code == 0, res.output
    assert (clone / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    assert git(clone, "status", "--porcelain").stdout == ""
    return clone, res.output


def test_push_pull_through_a_folder(repo, tmp_path):
    sd = checkpoint()
    commit(repo, sd, "v1")
    sd["a.weight"] += 1
    commit(repo, sd, "v2")
    remote = str(tmp_path / "shared")
    res = runner.invoke(app, ["git", "push", remote, "--repo", str(repo)])
    assert res.exit_code == 0 and "sent 7 object(s)" in res.output  # header + 5 tensors + a.weight v2
    assert "sent 0 object(s)" in runner.invoke(app, ["git", "push", remote, "--repo", str(repo)]).output
    clone, out = _clone_and_pull(repo, tmp_path, remote)
    assert "fetched 7 object(s)" in out and "wrote 1 checkpoint(s)" in out
    git(clone, "checkout", "-q", "HEAD~1")  # old revisions check out too: their objects came along
    assert torch.equal(load_file(clone / "model.safetensors")["a.weight"], checkpoint()["a.weight"])
    # a damaged remote object is refused, not stored
    obj = next(p for p in (tmp_path / "shared" / "objects").rglob("*") if p.is_file() and p.stat().st_size == 8192)
    obj.write_bytes(b"\0" * 8192)
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(repo), str(other))
    res = runner.invoke(app, ["git", "pull", remote, "--repo", str(other)])  # no drivers: git would store raw weights
    assert res.exit_code == 1 and "run `moerge git install` first" in res.output
    install(other)
    res = runner.invoke(app, ["git", "pull", remote, "--repo", str(other)])
    assert res.exit_code == 1 and "1 object(s) are damaged there" in res.output and "delete" in res.output
    assert "6 other object(s) were fetched" in res.output
    # a damaged local object is fetched again by pull (pull re-hashes what it has)
    local = objects(clone)
    victim = next(d for d in local.digests() if local.size(d) == 2048)
    data = bytearray(local.path(victim).read_bytes())
    data[0] ^= 1
    local.path(victim).write_bytes(bytes(data))
    assert runner.invoke(app, ["git", "verify", "--repo", str(clone)]).exit_code == 1
    res = runner.invoke(app, ["git", "pull", remote, "--repo", str(clone)])
    assert res.exit_code == 0 and "fetched 1 object(s)" in res.output
    assert runner.invoke(app, ["git", "verify", "--repo", str(clone)]).exit_code == 0
    res = runner.invoke(app, ["git", "pull", str(tmp_path / "typo"), "--repo", str(clone)])
    assert res.exit_code == 1 and "no such remote" in res.output
    assert runner.invoke(app, ["git", "push", "", "--repo", str(clone)]).exit_code == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_pull_through_s3_on_a_local_server(repo, tmp_path, monkeypatch):
    """The real s3fs client against moto's S3-compatible server on localhost (no network)."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        import fsspec
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.config.set_conf_env(fsspec.config.conf)
        fs = s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
        fs.mkdir("models")
        commit(repo, checkpoint(), "v1")
        res = runner.invoke(app, ["git", "push", "s3://models/team", "--repo", str(repo)])
        assert res.exit_code == 0 and "sent 6 object(s)" in res.output, res.output
        assert len(fs.find("models/team/objects")) == 6
        _, out = _clone_and_pull(repo, tmp_path, "s3://models/team")
        assert "fetched 6 object(s)" in out
        res = runner.invoke(app, ["git", "pull", "s3://nobucket/x", "--repo", str(repo)])
        assert res.exit_code == 1 and "s3://nobucket/x: no such remote" in res.output
    finally:
        server.stop()


def test_cli_install_track_and_errors(tmp_path):
    r = runner.invoke(app, ["git", "install", "--repo", str(tmp_path)])
    assert r.exit_code == 1 and "not inside a git repository; run `git init` first" in r.output
    git(tmp_path, "init", "-q")
    r = runner.invoke(app, ["git", "track", "--repo", str(tmp_path)])
    assert r.exit_code == 0 and "run `moerge git install` too" in r.output
    r = runner.invoke(app, ["git", "install", "--repo", str(tmp_path)])
    assert r.exit_code == 0
    cfg = git(tmp_path, "config", "--local", "--get", "filter.moerge.clean").stdout
    assert "-m moerge.vcs.filter clean" in cfg and sys.executable in cfg
    assert "*.safetensors filter=moerge diff=moerge merge=moerge -text" in (tmp_path / ".gitattributes").read_text()
    r = runner.invoke(app, ["git", "track", "bad pattern", "--repo", str(tmp_path)])
    assert r.exit_code == 1 and "without spaces" in r.output
    r = runner.invoke(app, ["git", "push", str(tmp_path / "remote"), "--repo", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no such folder" in r.output
    # the filters start without torch (git runs them once per file)
    code = "import sys, moerge.vcs.filter, moerge.vcs.diff; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_one_filter_process_serves_many_files(repo):
    """git's long-running filter protocol: several checkpoints in one `git add` and one checkout, through
    one moerge process (git's trace shows a single start), each file round-tripping exactly."""
    for i in range(4):
        save_file(checkpoint(i), repo / f"m{i}.safetensors")
    originals = {i: (repo / f"m{i}.safetensors").read_bytes() for i in range(4)}
    env = dict(os.environ, GIT_TRACE="1")
    r = subprocess.run(["git", "add", "-A"], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stderr.count("moerge.vcs.process") == 1
    git(repo, "commit", "-qm", "four")
    for i in range(4):
        (repo / f"m{i}.safetensors").unlink()
    r = subprocess.run(["git", "checkout", "--", "."], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stderr.count("moerge.vcs.process") == 1
    assert all((repo / f"m{i}.safetensors").read_bytes() == originals[i] for i in range(4))


def test_gc_keeps_what_commits_reflogs_and_the_index_name(repo):
    sd = checkpoint()
    commit(repo, sd, "v1")
    store = objects(repo)
    sd["a.weight"] += 1
    save_file(sd, repo / "model.safetensors")
    git(repo, "add", "-A")  # staged only
    staged = set(store.digests())
    sd["a.weight"] += 1
    save_file(sd, repo / "model.safetensors")
    git(repo, "add", "-A")  # restaged: the previous a.weight is now unreferenced
    orphan = staged - set(referenced_now(repo))
    assert len(orphan) == 1
    r = runner.invoke(app, ["git", "gc", "--repo", str(repo)])
    assert r.exit_code == 0 and "removed 0" in r.output  # younger than --min-age
    r = runner.invoke(app, ["git", "gc", "--min-age", "0", "--repo", str(repo)])
    assert r.exit_code == 0 and "removed 1 unreferenced object(s)" in r.output
    assert not (orphan & store.digests())
    # a change staged in another worktree is kept too
    wt = repo.parent / "wt"
    git(repo, "worktree", "add", "-q", str(wt), "-b", "side")
    s2 = load_file(wt / "model.safetensors")
    s2["c.bias"] += 5
    save_file(s2, wt / "model.safetensors")
    git(wt, "add", "-A")
    runner.invoke(app, ["git", "gc", "--min-age", "0", "--repo", str(repo)])
    (wt / "model.safetensors").unlink()
    git(wt, "checkout", "--", "model.safetensors")
    assert torch.equal(load_file(wt / "model.safetensors")["c.bias"], s2["c.bias"])
    git(repo, "commit", "-qm", "v2")
    git(repo, "reset", "-q", "--hard", "HEAD~1")  # v2 is only in the reflog now: kept
    runner.invoke(app, ["git", "gc", "--min-age", "0", "--repo", str(repo)])
    git(repo, "checkout", "-q", "HEAD@{1}", "--", "model.safetensors")
    assert torch.equal(load_file(repo / "model.safetensors")["a.weight"], sd["a.weight"])


def referenced_now(repo):
    from moerge.vcs.remote import referenced

    return referenced(repo, keep_all=True)


def test_diff_shows_metadata_and_merge_settings_are_checked(repo):
    sd = checkpoint()
    commit(repo, sd, "v1", meta={"step": "100"})
    save_file(sd, repo / "model.safetensors", metadata={"step": "200"})
    out = git(repo, "diff").stdout
    assert "metadata  step: '100' -> '200'" in out and "0 of 5 tensors changed" in out and "1 metadata key(s)" in out
    git(repo, "checkout", "-q", "--", "model.safetensors")

    def ours(sd):
        sd["a.weight"] += 1.0

    def theirs(sd):
        sd["a.weight"] += 3.0

    git(repo, "checkout", "-qb", "feat")
    s2 = {k: v.clone() for k, v in sd.items()}
    theirs(s2)
    commit(repo, s2, "feat", meta={"step": "100"})
    git(repo, "checkout", "-q", "main")
    s3 = {k: v.clone() for k, v in sd.items()}
    ours(s3)
    commit(repo, s3, "main", meta={"step": "100"})
    git(repo, "config", "moerge.merge.density", "0")
    r = git(repo, "merge", "feat", "-m", "m", check=False)
    assert r.returncode != 0 and "git config moerge.merge.density 0: the TIES density must be a number in (0, 1]" in r.stderr
    git(repo, "merge", "--abort", check=False)
    git(repo, "config", "moerge.merge.density", "1")
    git(repo, "config", "moerge.merge.method", "bogus")
    r = git(repo, "merge", "feat", "-m", "m", check=False)
    assert r.returncode != 0 and "git config moerge.merge.method bogus: unknown merge method" in r.stderr
    git(repo, "merge", "--abort", check=False)
    git(repo, "config", "moerge.merge.method", "ties")  # TIES averages agreeing changes, as recipes' ties does
    git(repo, "merge", "feat", "-m", "m")
    torch.testing.assert_close(load_file(repo / "model.safetensors")["a.weight"], sd["a.weight"] + 2.0)
