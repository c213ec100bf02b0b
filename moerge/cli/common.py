"""What every command shares: the consoles, the one-line error and warning, and the options that
appear on many commands (threads, dtype, library, embedder)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from moerge.errors import MoergeError
from moerge.util.progress import console

err = console(stderr=True)
out = console()
err = console(stderr=True)
out = console()
EMBEDDER_OPT = typer.Option(None, "--embedder", help="A sentence-embedding model (sentence-transformers folder or hub id) "
                            "for task embeddings instead of the base model; needs moerge[embed].")


def _fail(e: MoergeError) -> None:
    from rich.markup import escape

    # escaped: messages hold paths and extras such as moerge[lorahub], which are not markup
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def _user_errors():
    """A user-caused failure becomes one error line and exit code 1; each MoergeWarning raised inside
    (input accepted but not used as written) becomes one ``warning:`` line. Yields the warnings."""
    import warnings

    from moerge.errors import MoergeWarning

    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", MoergeWarning)
        try:
            yield notes
        except MoergeError as e:
            _warn(notes)
            _fail(e)
    _warn(notes)


def _warn(notes) -> None:
    from rich.markup import escape

    from moerge.errors import MoergeWarning

    seen = set()
    for w in notes:
        text = str(w.message)
        if issubclass(w.category, MoergeWarning) and text not in seen:
            seen.add(text)
            err.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _applies(setter: str):
    """The callback of a process-wide option (threads, dtype, device): when given, ``setter``
    ("module:function") applies it, a bad value being one error line. Imported only then: start-up
    time (the setters load torch)."""
    def callback(value):
        if value is not None:
            import importlib

            module, name = setter.split(":")
            with _user_errors():
                getattr(importlib.import_module(module), name)(value)
        return value

    return callback


THREADS_OPT = typer.Option(None, "--threads", callback=_applies("moerge.util.threads:set_threads"), metavar="N",
                           help="Torch threads for this command (default: $MOERGE_THREADS, else 1: fastest for the "
                           "tiny base and robust on a busy machine; more for large models on idle cores).")
DTYPE_HELP = ("What models compute in: auto (default; $MOERGE_DTYPE), float32 or bfloat16. auto keeps a bf16 checkpoint "
              "in bf16 where this CPU multiplies bf16 faster than float32, and computes everything else in float32.")
DTYPE_OPT = typer.Option(None, "--dtype", callback=_applies("moerge.lm.precision:set_dtype"),
                         metavar="auto|float32|bfloat16", help=DTYPE_HELP)
DEVICE_HELP = ("Where models compute: auto (default; $MOERGE_DEVICE: a CUDA GPU when torch sees one, else Apple MPS, "
               "else the CPU), cpu, cuda, cuda:N or mps. Training, evaluation, routing and serving follow it; merges, "
               "fusion and search only when a device is named (else the CPU).")
DEVICE_OPT = typer.Option(None, "--device", callback=_applies("moerge.lm.device:set_device"),
                          metavar="auto|cpu|cuda[:N]|mps", help=DEVICE_HELP)


DEVICE_MAP_OPT = typer.Option(None, "--device-map", callback=_applies("moerge.lm.device:set_device_map"), metavar="auto",
                              help="A base bigger than one device: spread it over the GPUs, the CPU and the disk "
                              "(accelerate; $MOERGE_DEVICE_MAP) for evaluation, routing and serving.")
MAX_MEMORY_OPT = typer.Option(None, "--max-memory", callback=_applies("moerge.lm.device:set_max_memory"),
                              metavar="0=20GiB,cpu=64GiB", help="What --device-map auto may use of each device "
                              "($MOERGE_MAX_MEMORY).")


LIBRARY = typer.Option(None, "--library", help="Library folder (default: $MOERGE_LIBRARY, else the current folder).")


def _library(path: Optional[Path]):
    from moerge.library import Library

    return Library.open(path)


def _params(items: list[str]) -> dict:
    """--param NAME=VALUE (repeatable): a merge method's global parameter, VALUE read as YAML."""
    import yaml

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise MoergeError(f"--param {item!r}: write NAME=VALUE, e.g. --param density=0.5")
        if name.strip() in out:
            raise MoergeError(f"--param {name.strip()}: given twice; give each parameter once")
        try:
            out[name.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MoergeError(f"--param {item!r}: the value is not YAML; give a number, true/false, or a list as [1, 0.5]") from None
    return out
