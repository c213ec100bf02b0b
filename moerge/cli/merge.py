"""Merging: `moerge merge`, `moe`, `search`, `methods`, and `tune dpo` after a merge."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moerge.cli.common import (
    DTYPE_OPT,
    THREADS_OPT,
    _applies,
    _user_errors,
    err,
    out,
)
from moerge.errors import MoergeError


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
    device: Optional[str] = typer.Option(None, "--device", callback=_applies("moerge.lm.device:set_device"),
                                         metavar="cpu|cuda[:N]|mps|auto", help="Compute each tensor there, streamed "
                                         "one at a time (mergekit's --cuda; default: the CPU, or $MOERGE_DEVICE)."),
) -> None:
    """Merge the models a recipe names into OUT_DIR. A recipe of several YAML documents (mergekit-multi's
    form) runs its stages in dependency order; only the final one writes OUT_DIR. A mergekit-moe config
    (base_model + experts) builds an MoE (Mixtral, Qwen MoE, Qwen3 MoE or DeepSeek MoE)."""
    from moerge import api

    with _user_errors():
        if dry_run:
            from moerge.engine.multi import MultiPlan, check_outputs

            p = api.plan(recipe, seed=seed, library=library, allow_same_experts=allow_same_experts,
                            keep_intermediates=keep_intermediates)
            if isinstance(p, MultiPlan):  # what the run would refuse about OUT and the kept stages, refused now
                check_outputs(p, out_dir, keep_intermediates, overwrite, lazy)
            out.print(p.summary(), highlight=False)
            return
        res = api.merge(recipe, out_dir, overwrite=overwrite, seed=seed, workers=workers, shard_size=out_shard_size,
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
    table = Table("model", *report.tasks, "mean", title=f"merge report ({report.prompts_line()}, computed in {report.dtype})")
    mean = lambda s: sum(s.values()) / max(1, len(s))  # noqa: E731
    table.add_row("[bold]merge", *[f"{report.merged[t]:.1%}" for t in report.tasks], f"{mean(report.merged):.1%}")
    for m in report.inputs:
        cells = [f"[bold]{m['scores'][t]:.1%}" if t in m["own"] else f"{m['scores'][t]:.1%}" for t in report.tasks]
        table.add_row(m["model"] + (" (base)" if m["role"] == "base" else ""), *cells, f"{mean(m['scores']):.1%}")
    out.print(table)
    for w in report.warnings:
        err.print(f"warning: {w}", highlight=False, markup=False)
    out.print(f"report written to {out_dir}/README.md and {out_dir}/merge_report.json", highlight=False)


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
    from moerge import api
    from moerge.moe.config import MoEConfig

    with _user_errors():
        if not isinstance(api.load_recipe(config), MoEConfig):
            raise MoergeError(f"{config}: is a merge recipe (merge_method), not an MoE config (base_model + experts); "
                              "run it with `moerge merge`")
    merge(config, out_dir, dry_run=dry_run, overwrite=overwrite, out_shard_size=out_shard_size, seed=seed, workers=None,
          quiet=quiet, library=library, keep_intermediates=None, allow_same_experts=allow_same_experts, lazy=False,
          eval_tasks=None, eval_n=100)


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
    from moerge.util.files import output_file

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


tune_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Tune a model after merging (DPO with TRL).")


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
