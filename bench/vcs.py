"""Checkpoints in git: moerge's filters against plain git (and Git-Theta, if installed), on one
synthetic checkpoint of about --size-mb MB (bf16 matrices, a Llama-like layout).

    python bench/vcs.py [--size-mb 1024] [--versions 3] [--git-theta /tmp/gt/bin]

For each tool: `git add` + commit of the first version, `git status` and `git add` with nothing
changed, then --versions commits each changing 1 % of the tensors, the bytes the repository holds
after them (git objects + moerge's object store, or LFS/Git-Theta storage), and a checkout of the
first version (smudge) next to copying the file with `cp`. One run; the machine is shared, so compare
within a run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(cmd, cwd, env=None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()[-400:]}")
    return time.perf_counter() - t


def make(path: Path, size_mb: int, version: int, changed: list[str] | None = None, base: dict | None = None) -> dict:
    import torch
    from safetensors.torch import save_file

    if base is None:
        g = torch.Generator().manual_seed(0)
        n = max(1, size_mb * (1 << 20) // (2 * 1024 * 1024))  # 1024x1024 bf16 = 2 MiB each
        base = {f"model.layers.{i // 7}.{['q', 'k', 'v', 'o', 'gate', 'up', 'down'][i % 7]}.weight":
                torch.randn(1024, 1024, generator=g).to(torch.bfloat16) for i in range(n)}
    sd = dict(base)
    for name in changed or []:
        sd[name] = (base[name].float() + 0.01 * version).to(torch.bfloat16)
    save_file(sd, path, metadata={"format": "pt"})
    return base


def bench_tool(tool: str, root: Path, args, env) -> dict:
    repo = root / tool
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "b@example.com"], repo)
    run(["git", "config", "user.name", "bench"], repo)
    if tool == "moerge":
        run([sys.executable, "-m", "moerge.cli", "git", "install"], repo)
        run([sys.executable, "-m", "moerge.cli", "git", "track", "*.safetensors"], repo)
    elif tool == "git-theta":
        gt = Path(args.git_theta) / "git-theta"
        run([str(gt), "install", "--repo"], repo, env)
        run([str(gt), "track", "model.safetensors"], repo, env)
    ck = repo / "model.safetensors"
    base = make(ck, args.size_mb, 0)
    size = ck.stat().st_size
    res = {"tool": tool, "file_mb": size / 1e6}
    res["first add+commit"] = run(["git", "add", "-A"], repo, env) + run(["git", "commit", "-qm", "v0"], repo, env)
    res["status, unchanged"] = run(["git", "status", "--porcelain"], repo, env)
    res["add, unchanged"] = run(["git", "add", "-A"], repo, env)
    names = sorted(base)
    k = max(1, len(names) // 100)
    stored0 = du(repo / ".git")
    changed_bytes, commits = 0, []
    for v in range(1, args.versions + 1):
        changed = names[(v - 1) * k: v * k]
        make(ck, args.size_mb, v, changed, base)
        changed_bytes += sum(base[n].numel() * 2 for n in changed)
        commits.append(run(["git", "add", "-A"], repo, env) + run(["git", "commit", "-qm", f"v{v}"], repo, env))
    res["1% commit (mean)"] = sum(commits) / len(commits)
    res["stored after versions"] = du(repo / ".git") - stored0
    res["changed bytes"] = changed_bytes
    res["stored / changed"] = res["stored after versions"] / changed_bytes
    ck.unlink()
    res["checkout v0"] = run(["git", "checkout", "-q", "HEAD~%d" % args.versions, "--", "model.safetensors"], repo, env)
    t = time.perf_counter()
    shutil.copyfile(ck, root / f"{tool}-copy.safetensors")
    res["cp of the file"] = time.perf_counter() - t
    res["checkout / cp"] = res["checkout v0"] / res["cp of the file"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--git-theta", default=None, help="folder holding the git-theta command (its own venv)")
    ap.add_argument("--keep", default=None)
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="moerge-vcs-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    tools = ["git", "moerge"] + (["git-theta"] if args.git_theta else [])
    rows = []
    for tool in tools:
        if tool == "git-theta":
            env = dict(os.environ, PATH=f"{args.git_theta}:{os.environ['PATH']}")
        try:
            rows.append(bench_tool(tool, root, args, env))
        except Exception as e:  # a tool that fails is a row saying so, not a crash of the table
            rows.append({"tool": tool, "error": str(e)[:200]})
        print(f"{tool} done", file=sys.stderr, flush=True)
    keys = ["file_mb", "first add+commit", "status, unchanged", "add, unchanged", "1% commit (mean)",
            "stored after versions", "changed bytes", "stored / changed", "checkout v0", "cp of the file", "checkout / cp"]
    print(f"{'measure':<24}" + "".join(f"{r['tool']:>14}" for r in rows))
    for k in keys:
        cells = []
        for r in rows:
            v = r.get(k)
            if v is None:
                cells.append(f"{'-' if 'error' not in r else 'failed':>14}")
            elif k in ("stored after versions", "changed bytes"):
                cells.append(f"{v / 1e6:>11.1f} MB")
            elif k in ("stored / changed", "checkout / cp"):
                cells.append(f"{v:>13.2f}x")
            elif k == "file_mb":
                cells.append(f"{v:>11.0f} MB")
            else:
                cells.append(f"{v:>12.2f} s")
        print(f"{k:<24}" + "".join(cells))
    for r in rows:
        if "error" in r:
            print(f"{r['tool']}: {r['error']}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
