"""`moerge library`: the versioned expert library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moerge.cli.common import (
    EMBEDDER_OPT,
    LIBRARY,
    _library,
    _user_errors,
    err,
    out,
)
from moerge.errors import MoergeError

library_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                          help="The versioned expert library (SQLite catalog + deduplicated blobs).")


@library_app.command("init")
def library_init(
    root: Path = typer.Argument(..., help="Folder for the new library."),
    base: Optional[str] = typer.Option(None, "--base", help="The base model every expert must fit: a folder, hub id "
                                       "or real base's name (default: the built-in base)."),
) -> None:
    """Create a library bound to one base model."""
    from moerge.library import Library

    with _user_errors():
        lib = Library.init(root, base)
    out.print(f"created library {root} for base {lib.meta['base']} ({lib.meta['base_fingerprint']})", highlight=False)


@library_app.command("add")
def library_add(
    adapter_dir: Path = typer.Argument(..., help="A PEFT adapter folder (LoRA, DoRA, (IA)3) or a full fine-tune."),
    name: str = typer.Option(..., "--name", help="Expert name; adding it again creates the next version."),
    task: Optional[str] = typer.Option(None, "--task", help="Task (default: the expert card's)."),
    tags: str = typer.Option("", "--tags", help="Comma-separated tags."),
    contributor: Optional[str] = typer.Option(None, "--contributor"),
    license: Optional[str] = typer.Option(None, "--license"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Its task's prompts (JSONL with \"prompt\" fields, or one per "
                                           "line): their task centroids go into the stored card, for task-level routing."),
    embedder: Optional[str] = EMBEDDER_OPT,
    library: Optional[Path] = LIBRARY,
) -> None:
    """Check an adapter against the library's base and store it as NAME@<next version>."""
    from moerge.library import NothingAdded
    from moerge.tasks.data import read_prompts

    with _user_errors() as notes:
        if embedder and not prompts:
            raise MoergeError("--embedder embeds the prompts given with --prompts FILE; give both")
        entry = _library(library).add(adapter_dir, name, task=task, tags=[t for t in tags.split(",") if t],
                                      contributor=contributor, license=license,
                                      prompts=read_prompts(prompts) if prompts else None, embedder=embedder)
    if not any(issubclass(w.category, NothingAdded) for w in notes):
        out.print(f"added {entry.ref} ({entry.kind}, {entry.nbytes / 1e6:.2f} MB)", highlight=False)


@library_app.command("list")
def library_list(
    task: Optional[str] = typer.Option(None, "--task"),
    tag: Optional[str] = typer.Option(None, "--tag"),
    kind: Optional[str] = typer.Option(None, "--kind", help="Expert kind: lora, dora, ia3, ... (an unknown one is refused with the list)."),
    library: Optional[Path] = LIBRARY,
) -> None:
    """The experts, every version."""
    with _user_errors():
        entries = _library(library).experts(task=task, tag=tag, kind=kind)
    if not entries:
        asked = [f"--{k} {v}" for k, v in (("task", task), ("tag", tag), ("kind", kind)) if v]
        out.print(f"no experts match {' '.join(asked)}" if asked else
                  "the library holds no experts yet; add one with `moerge library add DIR --name NAME`", highlight=False)
        return
    table = Table("expert", "kind", "task", "tags", "MB", "contributor", "validation", "made on", title="expert library")
    for e in entries:
        val = e.card.get("validation_accuracy")
        table.add_row(e.ref, e.kind, e.task or "-", ",".join(e.tags) or "-", f"{e.nbytes / 1e6:.2f}", e.contributor or "-",
                      "-" if val is None else f"{val:.0%}", f"base@{e.base_version}")
    out.print(table)


@library_app.command("show")
def library_show(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION."),
    as_json: bool = typer.Option(False, "--json", help="Everything the catalog holds, as JSON (centroids included)."),
    library: Optional[Path] = LIBRARY,
) -> None:
    """One expert version: catalog fields, adapter settings and its card (centroids summarised)."""
    from dataclasses import asdict

    from moerge.library import describe

    with _user_errors():
        lib = _library(library)
        entry = lib.get(ref)
    if as_json:
        out.print_json(json.dumps(asdict(entry) | {"ref": entry.ref}))
        return
    for line in describe(lib, entry):
        out.print(line, highlight=False, markup=False, soft_wrap=True)


@library_app.command("export")
def library_export(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION."),
    out_dir: Path = typer.Argument(..., help="PEFT adapter folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    library: Optional[Path] = LIBRARY,
) -> None:
    """Write an expert as a PEFT adapter folder (PeftModel.from_pretrained loads it)."""
    with _user_errors():
        path = _library(library).export(ref, out_dir, overwrite=overwrite)
    out.print(f"wrote {path}", highlight=False)


@library_app.command("rm")
def library_rm(ref: str = typer.Argument(..., help="NAME (every version) or NAME@VERSION."), library: Optional[Path] = LIBRARY) -> None:
    """Remove experts from the catalog (`gc` frees their blobs)."""
    with _user_errors():
        gone = _library(library).remove(ref)
    out.print(f"removed {', '.join(gone)}", highlight=False)


@library_app.command("verify")
def library_verify(library: Optional[Path] = LIBRARY) -> None:
    """Re-hash every blob; report corruption by expert and tensor (exit 1 if any)."""
    with _user_errors():
        problems, orphans = _library(library).verify()
    for p in problems:
        err.print(f"corrupt: {p}", highlight=False)
    if orphans:
        out.print(f"{len(orphans)} unreferenced blobs (left by an interrupted add or by rm; `moerge library gc` frees them)", highlight=False)
    if problems:
        raise typer.Exit(1)
    out.print("ok: every expert's tensors match their hashes", highlight=False)


def _copied_line(verb: str, copied: list[str]) -> str:
    bases = [c for c in copied if c.startswith("base@")]
    experts = [c for c in copied if not c.startswith("base@")]
    line = f"{verb} {len(experts)} expert versions" + (f": {', '.join(experts)}" if experts else "")
    return line + (f"; and {len(bases)} fused base version(s): {', '.join(bases)}" if bases else "")


@library_app.command("push")
def library_push(dest: str = typer.Argument(..., help="Another library location (path or fsspec URL)."), library: Optional[Path] = LIBRARY) -> None:
    """Copy the experts DEST lacks, sending only missing blobs (DEST is created if needed)."""
    with _user_errors():
        copied = _library(library).push(dest)
    out.print(_copied_line("pushed", copied), highlight=False, markup=False)


@library_app.command("pull")
def library_pull(src: str = typer.Argument(..., help="Another library location (path or fsspec URL)."), library: Optional[Path] = LIBRARY) -> None:
    """Copy the experts SRC has and this library lacks."""
    with _user_errors():
        copied = _library(library).pull(src)
    out.print(_copied_line("pulled", copied), highlight=False, markup=False)


@library_app.command("gc")
def library_gc(
    min_age: float = typer.Option(3600, "--min-age", help="Only blobs unreferenced and older than this many seconds."),
    library: Optional[Path] = LIBRARY,
) -> None:
    """Delete blobs no expert references."""
    with _user_errors():
        n = _library(library).gc(min_age)
    out.print(f"removed {n} blobs", highlight=False)


@library_app.command("bases")
def library_bases(
    as_json: bool = typer.Option(False, "--json", help="Every base version with its card, as JSON."),
    library: Optional[Path] = LIBRARY,
) -> None:
    """The library's chain of bases: base@1 and each fused version, with its lineage."""
    with _user_errors():
        lib = _library(library)
        chain = lib.bases()
        counts = {b.version: len(lib.experts(base_version=b.version)) for b in chain}
    if as_json:
        out.print_json(json.dumps([{"ref": b.ref, "path": str(b.path), "fingerprint": b.fingerprint, "card": b.card,
                                    "experts": counts[b.version]} for b in chain]))
        return
    table = Table("base", "made from", "method", "contributions", "experts on it", "path", title="base versions")
    for b in chain:
        c = b.card
        made = f"base@{c['parent']}" if "parent" in c else "(original)"
        table.add_row(b.ref, made, c.get("method", ""), ", ".join(x["expert"] for x in c.get("contributions", [])),
                      str(counts[b.version]), str(b.path.resolve()))
    out.print(table)
