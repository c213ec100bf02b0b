"""`moerge fuse`: ColD Fusion rounds into a library's next base."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moerge.cli.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    LIBRARY,
    THREADS_OPT,
    _library,
    _params,
    _user_errors,
    out,
)

fuse_app = typer.Typer(rich_markup_mode=None, help="Fuse the contributions made on a library's latest base into its next base version "
                            "(ColD Fusion); `moerge fuse simulate` runs the whole loop.")


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
    n_eval: int = typer.Option(100, "--eval-n", "--n-eval", min=1, help="Test prompts per task for --eval (as merge --eval-n)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan; write nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
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
    for note in res.plan.notes:
        out.print(note, highlight=False, markup=False)
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
