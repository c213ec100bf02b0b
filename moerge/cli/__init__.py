"""The ``moerge`` command: a thin typer layer over the Python API, one module per command group.

This file is the command tree: it registers each module's commands and groups, in the order ``moerge
--help`` lists them. Every user-caused failure is a MoergeError: printed as one ``error:`` line, exit
code 1, no traceback (``common``). Commands import the API inside their functions (start-up time:
``moerge --help`` loads no torch); defaults and budgets live in the API, not here.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from moerge.cli import (
    base,
    demo,
    eval,
    expert,
    fuse,
    git,
    library,
    merge,
    route,
    serve,
    tasks,
)
from moerge.cli.common import DEVICE_MAP_OPT, DEVICE_OPT, DTYPE_HELP, MAX_MEMORY_OPT, _user_errors, err, out

app = typer.Typer(
    rich_markup_mode=None,  # help texts are plain: NAME[@V] and moerge[embed] must print as written
    name="moerge", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Merge, route and version specialist experts built from one base model.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(value: bool) -> None:
    if value:
        from moerge.version import __version__

        out.print(f"moerge {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", help="Torch threads for every command "
                                          "(default: $MOERGE_THREADS, else 1)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="auto|float32|bfloat16", help=DTYPE_HELP),
    device: Optional[str] = DEVICE_OPT,
    device_map: Optional[str] = DEVICE_MAP_OPT,
    max_memory: Optional[str] = MAX_MEMORY_OPT,
) -> None:
    """Merge, route and version specialist experts built from one base model."""
    from moerge.lm.precision import set_dtype
    from moerge.util.threads import set_threads

    with _user_errors():
        set_threads(threads)
        set_dtype(dtype)
        if max_memory is not None and device_map is None:
            from moerge.errors import MoergeError

            raise MoergeError("--max-memory says what --device-map auto may use of each device; add --device-map auto")
        if os.environ.get("MOERGE_MAX_MEMORY", "").strip():  # the variable, checked as the option is
            from moerge.lm.device import device_map as spread
            from moerge.lm.device import max_memory as limits

            limits()
            if not spread():
                from moerge.errors import MoergeError

                raise MoergeError("$MOERGE_MAX_MEMORY says what --device-map auto may use of each device; add "
                                  "--device-map auto (or set $MOERGE_DEVICE_MAP=auto), or unset it")


# commands, then groups: the order of `moerge --help`
app.command()(merge.merge)
app.command("moe")(merge.moe)
app.command("search")(merge.search_cmd)
app.command()(merge.methods)
app.command()(demo.demo)
app.command("eval")(eval.eval_cmd)
app.command("generate")(route.generate_cmd)
app.command("serve")(serve.serve_cmd)
app.add_typer(base.base_app, name="base")
app.add_typer(expert.expert_app, name="expert")
app.add_typer(tasks.tasks_app, name="tasks")
app.add_typer(library.library_app, name="library")
app.add_typer(merge.tune_app, name="tune")
app.add_typer(route.route_app, name="route")
app.add_typer(fuse.fuse_app, name="fuse")
app.add_typer(git.git_app, name="git")


def main() -> None:  # console_scripts entry point
    """The ``moerge`` command. A usage error (an unknown option, a value out of range) is one
    ``error:`` line naming the option and where the help is, exit code 2, like every other refusal."""
    import importlib

    # click's exceptions, wherever this typer keeps them (it vendors click as typer._click)
    exc = importlib.import_module(typer.BadParameter.__module__)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = app(standalone_mode=False)
    except exc.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `moerge` alone: its help
            out.print(e.format_message(), highlight=False, markup=False, soft_wrap=True)
            sys.exit(2)
        from rich.markup import escape

        where = e.ctx.command_path if e.ctx is not None else "moerge"
        err.print(f"[bold red]error:[/] {escape(e.format_message())} (see `{where} -h`)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted", highlight=False, markup=False)
        sys.exit(130)
    except Exception as e:  # a failure no command foresaw: one line naming it, the traceback on request
        if os.environ.get("MOERGE_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        err.print(f"error: internal error: {type(e).__name__}: {first} (this is a bug in moerge or a case it does not "
                  "handle; MOERGE_DEBUG=1 shows the traceback)", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

