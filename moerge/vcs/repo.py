"""A git repository's moerge set-up: where its objects live, and the filter, diff and merge drivers
registered in its ``.git/config`` (real git does the rest).

    .git/moerge/objects/ab/cdef...   one file per distinct tensor (sha256 of its bytes)
    .git/moerge/tmp/                 objects being written
    .gitattributes                   *.safetensors filter=moerge diff=moerge merge=moerge -text

The drivers are this Python's modules (``python -m moerge.vcs.filter`` ...), run by absolute path so
they work from any shell and inside a venv; none imports torch except the merge driver.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from moerge.errors import MoergeError
from moerge.vcs.objects import ObjectStore

DRIVER = "moerge"
DEFAULT_PATTERNS = ("*.safetensors",)


def git(*args: str, cwd: str | os.PathLike | None = None, check: bool = True) -> str:
    if cwd is not None and not Path(cwd).is_dir():
        raise MoergeError(f"{cwd}: no such folder")
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise MoergeError("git is not installed (or not on PATH); moerge's version control runs real git") from None
    if check and r.returncode:
        msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise MoergeError(f"git {' '.join(args)}: {msg[-1] if msg else f'exit {r.returncode}'}")
    return r.stdout


def git_dir(cwd: str | os.PathLike | None = None) -> Path:
    """The repository's (common) git directory, absolute."""
    if cwd is not None and not Path(cwd).is_dir():
        raise MoergeError(f"{cwd}: no such folder")
    try:
        out = git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=cwd).strip()
    except MoergeError:
        raise MoergeError(f"{Path(cwd or '.').resolve()}: not inside a git repository; run `git init` first") from None
    return Path(out)


def worktree(cwd: str | os.PathLike | None = None) -> Path:
    """The top of the working tree (refused in a bare repository or inside .git)."""
    git_dir(cwd)  # outside any repository: the one clear message
    if git("rev-parse", "--is-inside-work-tree", cwd=cwd, check=False).strip() != "true":
        raise MoergeError(f"{Path(cwd or '.').resolve()}: not in a working tree (a bare repository, or inside .git); run "
                          "moerge git commands in the repository's working folder")
    return Path(git("rev-parse", "--show-toplevel", cwd=cwd).strip())


def objects(cwd: str | os.PathLike | None = None, gdir: Path | None = None) -> ObjectStore:
    g = gdir or git_dir(cwd)
    return ObjectStore(g / "moerge" / "objects", g / "moerge" / "tmp")


def _module(name: str) -> str:
    return f"{shlex.quote(sys.executable)} -m moerge.vcs.{name}"


def install(cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """Register the drivers in this repository's .git/config (idempotent); returns what was set."""
    worktree(cwd)  # a clear error outside a repository, in a bare one, or inside .git
    settings = {
        f"filter.{DRIVER}.clean": f"{_module('filter')} clean %f",
        f"filter.{DRIVER}.smudge": f"{_module('filter')} smudge %f",
        f"filter.{DRIVER}.process": f"{_module('process')}",  # one process per git command (clean/smudge: fallback)
        f"filter.{DRIVER}.required": "true",
        f"diff.{DRIVER}.command": f"{_module('diff')}",
        f"diff.{DRIVER}.textconv": f"{_module('diff')} --textconv",
        f"diff.{DRIVER}.binary": "false",
        f"merge.{DRIVER}.name": "moerge parameter-aware checkpoint merge",
        f"merge.{DRIVER}.driver": f"{_module('merge')} %O %A %B %P",
    }
    for k, v in settings.items():
        git("config", "--local", k, v, cwd=cwd)
    return settings


def installed(cwd: str | os.PathLike | None = None) -> bool:
    return bool(git("config", "--local", "--get", f"filter.{DRIVER}.clean", cwd=cwd, check=False).strip())


def tracked(top: Path, paths: list[str]) -> list[str]:
    """The paths whose gitattributes say filter=moerge (one ``git check-attr`` for all of them)."""
    if not paths:
        return []
    r = subprocess.run(["git", "check-attr", "--stdin", "filter"], cwd=top, input="\n".join(paths) + "\n",
                       capture_output=True, text=True)
    return [ln.split(": ")[0] for ln in r.stdout.splitlines() if ln.endswith(f": filter: {DRIVER}")]


def tracked_patterns(cwd: str | os.PathLike | None = None) -> list[str]:
    path = worktree(cwd) / ".gitattributes"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.startswith("#") and f"filter={DRIVER}" in ln]


def track(patterns: list[str] | tuple[str, ...] = DEFAULT_PATTERNS, cwd: str | os.PathLike | None = None) -> list[str]:
    """Add ``PATTERN filter=moerge diff=moerge merge=moerge -text`` lines to .gitattributes (once each);
    returns the patterns added."""
    top = worktree(cwd)
    path = top / ".gitattributes"
    lines = path.read_text().splitlines() if path.is_file() else []
    have = {ln.split()[0] for ln in lines if ln.strip() and not ln.startswith("#") and f"filter={DRIVER}" in ln}
    added = []
    for p in patterns:
        if not p.strip() or any(c.isspace() for c in p):
            raise MoergeError(f"track {p!r}: a pattern is one gitattributes pattern without spaces, e.g. '*.safetensors'")
        if p not in have:
            lines.append(f"{p} filter={DRIVER} diff={DRIVER} merge={DRIVER} -text")
            added.append(p)
    if added:
        tmp = path.with_name(f".gitattributes.{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    return added
