"""`moerge git`: checkpoints versioned in git, tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moerge.cli.common import (
    _user_errors,
    out,
)

git_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                      help="Version checkpoints in git, tensor by tensor: filters, diffs, merges.")


@git_app.command("install")
def git_install(repo: Path = typer.Option(Path("."), "--repo", help="The git repository (default: the current one).")) -> None:
    """Register moerge's clean/smudge filter, diff driver and merge driver in this repository's .git/config."""
    from moerge.vcs.repo import git_dir, install, tracked_patterns

    with _user_errors():
        settings = install(repo)
        tracked = tracked_patterns(repo)
        where = git_dir(repo) / "config"
    nxt = (f"tracking {', '.join(tracked)}" if tracked else "now `moerge git track '*.safetensors'`")
    out.print(f"installed in {where}: filter, diff and merge drivers 'moerge' ({len(settings)} settings); {nxt}",
              highlight=False, markup=False, soft_wrap=True)


@git_app.command("track")
def git_track(
    patterns: list[str] = typer.Argument(None, help="gitattributes patterns (default: *.safetensors)."),
    repo: Path = typer.Option(Path("."), "--repo", help="The git repository (default: the current one)."),
) -> None:
    """Track files matching PATTERN with moerge (.gitattributes: filter, diff and merge = moerge)."""
    from moerge.vcs.repo import DEFAULT_PATTERNS, installed, track

    with _user_errors():
        added = track(patterns or list(DEFAULT_PATTERNS), repo)
        ready = installed(repo)
    what = ", ".join(added) if added else "nothing new (already tracked)"
    out.print(f"tracking {what} in .gitattributes" + ("" if ready else "; run `moerge git install` too (this clone has "
                                                             "no drivers yet)"), highlight=False, markup=False, soft_wrap=True)


@git_app.command("add")
def git_add(
    files: list[str] = typer.Argument(..., help="Checkpoint file(s) to stage (relative to --repo, as `git -C`)."),
    lora: str = typer.Option(..., "--lora", help="The LoRA that explains the change: a PEFT adapter folder or "
                             "library://NAME[@V]."),
    rev: str = typer.Option("HEAD", "--from", help="The revision the checkpoint changed from."),
    library: Optional[Path] = typer.Option(None, "--library", help="The library for library:// (default: "
                                           "$MOERGE_LIBRARY or the current folder)."),
    repo: Path = typer.Option(Path("."), "--repo", help="The git repository (default: the current one)."),
) -> None:
    """git add, keeping the tensors a LoRA changed as its factors (exact, rebuilt on checkout) instead of
    dense copies; prints the bytes saved."""
    from moerge.vcs.add import add

    with _user_errors():
        res = add(files, lora=lora, rev=rev, library=library, cwd=repo)
    line = (f"staged {', '.join(res.files)}: {res.factored} tensor(s) kept as factors, {res.stored_bytes / 1e6:.2f} MB "
            f"instead of {res.dense_bytes / 1e6:.2f} MB dense ({res.saved / 1e6:.2f} MB saved"
            + (f", {res.dense_bytes / max(res.stored_bytes, 1):.1f}x smaller" if res.factored else "") + ")"
            + (f"; {res.already} more were kept as factors by an earlier add" if res.already else ""))
    out.print(line, highlight=False, markup=False, soft_wrap=True)
    if res.kept_dense:
        out.print(f"{len(res.kept_dense)} tensor(s) the adapter targets are kept dense: as factors, with what they do "
                  f"not explain of the change, they would take over half the dense bytes (e.g. {res.kept_dense[0]})",
                  highlight=False, markup=False, soft_wrap=True)
    if res.untargeted:
        out.print(f"{len(res.untargeted)} changed tensor(s) the adapter does not touch are stored dense (e.g. "
                  f"{res.untargeted[0]})", highlight=False, markup=False, soft_wrap=True)


def _transfer_line(verb: str, url: str, res) -> str:
    line = f"{verb} {res.moved} object(s), {res.bytes / 1e6:.1f} MB ({res.already} already there) {url}"
    if res.missing:
        line += f"; {len(res.missing)} object(s) neither side has, e.g. {res.missing[0]}"
    return line


REMOTE_ARG = typer.Argument(..., help="Where objects are shared: a folder or fsspec URL (s3://bucket/prefix, ...).")
REPO_OPT = typer.Option(Path("."), "--repo", help="The git repository (default: the current one).")


@git_app.command("push")
def git_push(remote: str = REMOTE_ARG, repo: Path = REPO_OPT) -> None:
    """Send the tensor objects the remote lacks (those named by tracked checkpoints in any commit)."""
    _transfer("push", remote, repo)


@git_app.command("pull")
def git_pull(remote: str = REMOTE_ARG, repo: Path = REPO_OPT) -> None:
    """Fetch the tensor objects this clone lacks (run `git fetch`/`git pull` first for new commits), then
    write the working tree's checkpoints that were still manifests."""
    _transfer("pull", remote, repo)


def _transfer(kind: str, remote: str, repo: Path) -> None:
    from moerge.vcs import remote as vr

    written = []
    with _user_errors():
        res = (vr.push if kind == "push" else vr.pull)(remote, repo)
        out.print(_transfer_line("sent" if kind == "push" else "fetched", ("to " if kind == "push" else "from ") + remote, res),
                  highlight=False, markup=False, soft_wrap=True)
        if res.missing:
            raise typer.Exit(1)
        if kind == "pull":
            written = vr.materialize(repo)
    if written:
        out.print(f"wrote {len(written)} checkpoint(s) in the working tree: {', '.join(written[:5])}"
                  + (" ..." if len(written) > 5 else ""), highlight=False, markup=False, soft_wrap=True)


@git_app.command("gc")
def git_gc(
    min_age: float = typer.Option(3600, "--min-age", help="Keep unreferenced objects younger than this many seconds "
                                  "(a `git add` may still be running)."),
    repo: Path = REPO_OPT,
) -> None:
    """Delete tensor objects no tracked checkpoint names (in any commit, reflog entry or the index)."""
    from moerge.vcs.remote import gc

    with _user_errors():
        removed, freed = gc(repo, min_age)
    out.print(f"removed {removed} unreferenced object(s), {freed / 1e6:.1f} MB", highlight=False, markup=False, soft_wrap=True)


@git_app.command("verify")
def git_verify(repo: Path = REPO_OPT) -> None:
    """Re-hash every object the repository's checkpoints name; exit 1 naming file and tensor if any is bad."""
    from moerge.vcs.remote import verify

    with _user_errors():
        problems = verify(repo)
    for p in problems:
        out.print(p, highlight=False, markup=False, soft_wrap=True)
    if problems:
        out.print(f"{len(problems)} object(s) missing or damaged; `moerge git pull REMOTE` fetches them again",
                  highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print("every object of every tracked checkpoint is present and sound", highlight=False, markup=False, soft_wrap=True)
