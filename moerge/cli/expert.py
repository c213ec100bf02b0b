"""`moerge expert`: train, extract, combine, merge, gate, embed, show and rebase experts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moerge.cli.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    EMBEDDER_OPT,
    LIBRARY,
    THREADS_OPT,
    _library,
    _params,
    _user_errors,
    out,
)
from moerge.errors import MoergeError

expert_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Train and inspect specialist experts.")


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
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in the "
                                                "backward pass: less memory, about a third more time."),
    quantize: Optional[str] = typer.Option(None, "--quantize", metavar="4bit", help="QLoRA: the frozen base in 4-bit "
                                           "NF4 (CUDA and pip install 'moerge[qlora]')."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Train one expert from the base with PEFT (or fully) and write its card."""
    from moerge.api import train_expert

    with _user_errors():
        card = train_expert(out_dir, base=base, task=task, data=data, adapter=adapter, steps=steps, lr=lr, rank=rank,
                            batch_size=batch_size, seed=seed, embedder=embedder, gate_steps=gate_steps,
                            gradient_checkpointing=gradient_checkpointing, quantize=quantize,
                            overwrite=overwrite, progress=True)
    acc = "-" if card.validation_accuracy is None else f"{card.validation_accuracy:.1%}"
    out.print(f"wrote {out_dir}: {card.adapter} expert for {card.task}, {card.trainable_params:,} trainable parameters, "
              f"{card.seconds:.0f} s, validation exact match {acc}", highlight=False)


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
    base: Optional[Path] = typer.Option(None, "--base", help="The base they were trained on (default: the one the "
                                        "first adapter's expert.json names)."),
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


@expert_app.command("merge")
def expert_merge(
    experts: list[str] = typer.Argument(..., help="LoRA expert folders of one base, or library://NAME[@V]."),
    out_dir: Path = typer.Option(..., "--out", help="PEFT LoRA folder to write (with expert.json and moerge_merge.json)."),
    method: Optional[str] = typer.Option(None, "--method", help="A merge method that works on task vectors: "
                                         "iso_cts (default), iso_c, tsv, ties, dare_ties, task_arithmetic, linear, ..."),
    param: Optional[list[str]] = typer.Option(None, "--param", metavar="KEY=VALUE", help="A method parameter, as in a "
                                              "recipe, VALUE read as YAML (repeatable); per-expert values as a list: weight=[1,0.5]"),
    space: Optional[str] = typer.Option(None, "--space", help="core (default; exact for iso_c/iso_cts/tsv/linear), "
                                        "knots, or full (each update materialised)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank of every layer written (default: each layer's exact rank, "
                                       "at most the experts' ranks summed)."),
    seed: int = typer.Option(0, "--seed", help="Seed of random methods (DARE, DELLA)."),
    base: Optional[Path] = typer.Option(None, "--base", help="The experts' base (default: the one their cards name)."),
    task: Optional[str] = typer.Option(None, "--task", help="The merged expert's task (default: the inputs' tasks joined by +)."),
    add: Optional[str] = typer.Option(None, "--add", metavar="NAME", help="Also add it to the library under NAME."),
    search: Optional[str] = typer.Option(None, "--search", metavar="PARAMS", help="First choose these parameters "
                                         "(comma-separated, e.g. alpha) by the best score on validation rows of --tasks."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="--search: tasks to score on (default: the experts' own "
                                        "data, from their cards)."),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, max=50, help="--search: candidate merges to try (the "
                                         "value as given first; default 8)."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="--search: validation prompts per task for each candidate "
                                    "(default 30)."),
    library: Optional[Path] = LIBRARY,
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Merge LoRA experts into one LoRA expert (Iso-CTS, TSV, TIES, ... in their shared core space), with its
    lineage; --search first tunes alpha (or density, ...) on the experts' own validation rows."""
    from moerge.api import merge_lora

    with _user_errors():
        tune = [p.strip() for p in search.split(",") if p.strip()] if search is not None else None
        if search is not None and not tune:
            raise MoergeError("--search: name the parameters to tune, e.g. --search alpha")
        if not tune and (tasks is not None or budget is not None or n is not None):
            raise MoergeError("--tasks, --budget and --n set the search; add --search PARAMS (e.g. --search alpha)")
        res = merge_lora(experts, out_dir, method=method, params=_params(param or []), space=space, rank=rank, seed=seed, base=base,
                         task=task, library=library, add=add, overwrite=overwrite, tasks=tasks,
                         **({"budget": budget} if budget is not None else {}), **({"n": n} if n is not None else {}),
                         search=tune, progress=True)
    ranks = sorted(set(res.ranks.values()))
    shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    out.print(f"wrote {out_dir}: {len(experts)} experts merged by {res.method} in {res.space} space, {len(res.ranks)} "
              f"modules, {shown}, lowest energy kept {res.lowest_kept:.1%}, {res.seconds:.1f} s" +
              (f"; added to the library as {res.report['library_ref']}" if res.report.get("library_ref") else ""),
              highlight=False)
    found = res.report.get("search")
    if found:
        chosen = ", ".join(f"{k}={v:g}" for k, v in found["best"].items())
        given = ", ".join(f"{k}={v:g}" for k, v in found["as_given"].items())
        out.print(f"searched {found['seconds']:.0f} s: {chosen} (validation {found['validation']['best']:.1%}, test "
                  f"{found['test']['best']:.1%}) against {given} (validation {found['validation']['as_given']:.1%}, test "
                  f"{found['test']['as_given']:.1%}), on {', '.join(found['tasks'])}", highlight=False)


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
    from moerge.tasks.data import read_prompts
    from moerge.train.expert import embed_expert

    with _user_errors():
        entry = embed_expert(expert_dir, embedder, prompts=read_prompts(prompts) if prompts else None, base=base)
    out.print(f"wrote {len(entry['centroids'])} centroids ({len(entry['centroid'])}-dim) from {embedder or 'the base model'} "
              f"into {expert_dir / 'expert.json'}", highlight=False)


@expert_app.command("show")
def expert_show(
    expert_dir: Path = typer.Argument(..., help="An expert folder."),
    as_json: bool = typer.Option(False, "--json", help="The whole card as JSON (centroids included)."),
) -> None:
    """Print an expert's card (centroids summarised by their shape; --json: everything)."""
    from moerge.experts.card import describe_expert

    with _user_errors():
        card, lines = describe_expert(expert_dir)
    if as_json:
        out.print_json(json.dumps(card))
        return
    for line in lines:
        out.print(line, highlight=False, markup=False, soft_wrap=True)


@expert_app.command("rebase")
def expert_rebase(
    expert: str = typer.Argument(..., help="A library expert NAME[@V], or an adapter folder made on one of its bases."),
    to: Optional[int] = typer.Option(None, "--to", help="Target base version N of base@N (default: the latest)."),
    name: Optional[str] = typer.Option(None, "--name", help="Store it under this name (default: its own)."),
    n_eval: int = typer.Option(100, "--n-eval", help="Test prompts to measure how much of its skill survives."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Do not measure (and so re-fit only with --refit-steps)."),
    refit: bool = typer.Option(True, "--refit/--no-refit", help="Train a carried expert that lost skill further on the "
                               "new base, from its own weights, on its own data."),
    refit_steps: Optional[int] = typer.Option(None, "--refit-steps", help="Re-fit this many steps at a time until its "
                                              "validation score is back, for at most its own training steps or N, "
                                              "whichever is more (default: a quarter of them, at least 20); with "
                                              "--no-eval, N steps once, unmeasured."),
    keep: float = typer.Option(0.9, "--keep", help="Re-fit when the carried expert keeps less than this share of its score."),
    seed: int = typer.Option(0, "--seed"),
    library: Optional[Path] = LIBRARY,
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Re-apply an expert made on an older base to a newer one (its adapter factors, or a full fine-tune's
    delta), re-fit it there if it lost skill, and store it as its next version; report its skill before and after."""
    from moerge.fusion import rebase

    with _user_errors():
        res = rebase(_library(library), expert, to=to, name=name, n_eval=n_eval, evaluate=not no_eval, refit=refit,
                     refit_steps=refit_steps, keep=keep, seed=seed)
    line = f"stored {res.entry.ref}: {res.source} moved from base@{res.from_version} to base@{res.to_version}"
    if res.before is not None:
        kept = f", {res.retained:.1%} retained" if res.retained is not None else ""
        via = f" (carried {res.carried:.1%}, re-fitted {res.refit_steps} steps)" if res.refit_steps else ""
        n = res.entry.card["rebased"].get("test_prompts")
        line += (f"; {res.task}: {res.before:.1%} on base@{res.from_version} -> {res.after:.1%} on "
                 f"base@{res.to_version}{via}{kept} ({n} test prompts)")
    elif res.refit_steps:
        line += f"; re-fitted {res.refit_steps} steps (not measured)"
    out.print(line, highlight=False, markup=False)
    for note in res.notes:
        out.print(f"note: {note}", highlight=False, markup=False)
