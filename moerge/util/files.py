"""Output files and folders written whole: checked before the work starts (not an input, parent
writable), written under a temporary name and renamed when complete; and moerge's cache folder."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from moerge.errors import MoergeError


def cache_dir() -> Path:
    """``$MOERGE_CACHE`` or ``~/.cache/moerge``: the built-in base once built, real bases, statistics."""
    return Path(os.environ.get("MOERGE_CACHE") or Path.home() / ".cache" / "moerge")


def _input_paths(inputs) -> list[Path]:
    """Paths among ``inputs``: paths, or strings listing them (comma-separated task lists with
    ``lm-eval:`` items, ``base+adapter``); what does not exist (a task name) is left out."""
    paths: list[Path] = []
    for item in inputs or ():
        if item is None:
            continue
        if not isinstance(item, str):
            item = os.fspath(item)
        for part in item.split(","):
            part = part.strip().removeprefix("lm-eval:")
            for cand in {part, *part.split("+")}:
                if cand and Path(cand).exists():
                    paths.append(Path(cand).resolve())
    return paths


def not_an_input(out: str | os.PathLike, inputs, what: str, folder: bool = False) -> None:
    """Refuse an output that would overwrite what the command reads: the same path, an existing file
    inside an input folder, or (for an output folder, which replaces what is there) a folder holding
    an input or lying inside one. ``inputs``: paths or comma-separated lists of them; those that do
    not exist (task names) are ignored."""
    o = Path(out).resolve()
    for p in _input_paths(inputs):
        inside = p in o.parents
        if o == p or (folder and (inside or o in p.parents)) or (inside and o.exists()):
            raise MoergeError(f"{out}: would overwrite the input {p}; choose another path for the {what}")


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs=()) -> Path:
    """Refuse an output folder that exists (without ``overwrite``), cannot be made, or would replace
    one of the command's ``inputs``, before the work starts rather than after it."""
    out = Path(out)
    not_an_input(out, inputs, "output folder", folder=True)
    if out.exists() and not overwrite:
        raise MoergeError(f"{out}: already exists; pass --overwrite or choose another folder")
    if out.exists() and not out.is_dir():
        raise MoergeError(f"{out}: is a file; choose a folder name for the output")
    if out.exists():
        not_precious(out)
    _make_parent(out, "output folder")
    return out


def not_precious(out: Path) -> None:
    """What ``--overwrite`` must never replace, refused in one line: an expert library or anything in
    it (its catalog and blobs hold every expert), a git repository, and the current folder, the home
    folder or any folder holding them."""
    where = out.resolve()
    for folder in (where, *where.parents):
        if (folder / "library.json").is_file() and (folder / "catalog.sqlite").exists():
            what = "is the expert library" if folder == where else f"is inside the expert library {folder}"
            raise MoergeError(f"{out}: {what}; --overwrite would delete experts; choose another output folder")
    if (where / ".git").exists():
        raise MoergeError(f"{out}: holds a git repository; --overwrite would delete it; choose another output folder")
    for keep in (Path.cwd().resolve(), Path.home().resolve()):
        if keep == where or where in keep.parents:
            raise MoergeError(f"{out}: holds {keep}; --overwrite would delete it; choose another output folder")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``out``; on success it replaces ``out`` in one rename
    (an existing ``out`` only with ``overwrite``), on failure it is removed. A reader never sees a
    half-written folder under the final name."""
    out = check_output_dir(out, overwrite)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_file(path: str | os.PathLike, what: str = "output file", inputs=()) -> Path:
    """Check a file the command will write, before any work starts: its folder is created if missing,
    and a path that is a folder, lies under a file, cannot be written, or would overwrite one of the
    command's ``inputs`` is refused in one line."""
    path = Path(path)
    not_an_input(path, inputs, what)
    if path.is_dir():
        raise MoergeError(f"{path}: is a folder; give a file name for the {what}")
    return _make_parent(path, what)


def _make_parent(path: Path, what: str) -> Path:
    """Create ``path``'s folder if missing, or refuse in one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MoergeError(f"{path}: a part of its folder is a file; choose another path for the {what}") from None
    except OSError as e:
        raise MoergeError(f"{path}: cannot create its folder ({e.strerror}); choose another path for the {what}") from None
    if not os.access(path.parent, os.W_OK):
        raise MoergeError(f"{path}: its folder is not writable; choose another path for the {what}")
    return path


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` (same suffix, so writers that infer the format still do) to
    write to; renamed onto ``path`` when the block succeeds, removed when it fails. The folder is
    checked (and created) first, as ``output_file`` does."""
    path = output_file(path)
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data) -> Path:
    """``data`` as indented JSON, written atomically."""
    import json

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)
