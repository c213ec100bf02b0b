"""`moerge tasks`: the built-in skill suite and its JSONL export."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moerge.cli.common import (
    _user_errors,
    out,
)

tasks_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                        help="The built-in skill suite and its JSONL export.")


@tasks_app.command("list")
def tasks_list() -> None:
    """The built-in skills, with an example of each."""
    from moerge.tasks import examples, skills

    table = Table("task", "kind", "instructions", "example prompt", "completion", title="built-in skills")
    for name, s in skills.SKILLS.items():
        e = examples(name, "train", 1)[0]
        real = "real-model " if name in skills.REAL_EXPERTS + skills.REAL_HELDOUT else ""
        kind = real + ("held-out composite" if s.composite else "pretraining" if name in skills.PRETRAIN
                       else "expert" if name in skills.EXPERTS + skills.REAL_EXPERTS else "skill")
        table.add_row(name, kind, " | ".join(s.instructions), e.prompt, e.completion)
    out.print(table)


@tasks_app.command("export")
def tasks_export(
    task: str = typer.Argument(..., help="A built-in skill."),
    out_file: Path = typer.Argument(..., help="JSONL file to write."),
    split: str = typer.Option("train", "--split", help="train, validation or test."),
    n: int = typer.Option(1000, "--n", help="Number of examples."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a split of a skill as JSONL, the format `expert train --data` reads."""
    from moerge.tasks import examples, write_jsonl
    from moerge.util.files import output_file

    with _user_errors():
        output_file(out_file, "exported examples")
        write_jsonl(out_file, examples(task, split, n, seed))
    out.print(f"wrote {n} examples to {out_file}", highlight=False)
