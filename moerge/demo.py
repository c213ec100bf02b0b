"""``moerge demo``: the main job, offline, on the embedded tiny base or a real one.

From the base it trains one LoRA expert per skill, merges them through the merge engine (each
expert enters a recipe as ``base+expert``) and into one LoRA expert (``engine/lora_merge.py``), trains a multitask LoRA on the union of the experts'
data (the upper baseline that needs everybody's data), routes among the experts with every router,
and scores everything on each skill and on held-out composites of them. The scoreboard is printed,
written as JSON and drawn. On the tiny base it uses the tiny suite; on a real chat model
(``--base smollm2-135m-instruct``) the real-model suite, with settings sized for a 135M model on a
CPU (``SETTINGS``).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moerge import api
from moerge.errors import MoergeError
from moerge.eval import evaluate
from moerge.lm import base as base_model
from moerge.lm.precision import compute_dtype, folder_dtype
from moerge.methods import registry
from moerge.routing import load_routed
from moerge.routing.evaluate import evaluate_routed
from moerge.routing.routers.phatgoose import train_gates
from moerge.tasks import skills as suite
from moerge.tasks.suites import suite_for
from moerge.train.expert import load_expert, train_expert
from moerge.util.figures import pyplot, save_figure
from moerge.util.files import output_file, write_json
from moerge.util.progress import console as util_console
from moerge.util.progress import quiet_transformers

# merge settings for experts that each add one skill to a shared base. Task arithmetic adds the task
# vectors scaled by λ: the real setting takes λ = 0.4 (Ilharco et al. pick λ in [0.3, 0.5] on validation
# data when adding several tasks; at λ = 1 six LoRAs are added whole, which the real model did not survive).
MERGES = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    # data-aware: each expert's statistics on examples of its own skill (its card names them)
    "fisher": {"weight": 1.0},
    "regmean": {"weight": 1.0},
}


# LoRA-native merges (``moerge expert merge``): the experts merged into one LoRA expert in their shared core
# space (each takes about a second on the real model), written into the loaded base's weights and scored,
# at the LoRA defaults (engine/lora_merge.LORA_DEFAULTS: alpha and density as searched on real experts)
LORA_MERGES = {"iso_cts": {}, "tsv": {}, "ties": {}}


# routers compared in the demo (top-k); "oracle" knows each prompt's task. LoraHub (few-shot: 5
# labelled examples of each task) joins them when its optional search library, nevergrad, is installed.
ROUTERS = [("oracle", None), ("uniform", None), ("centroid", 1), ("smear", None), ("arrow", 1), ("phatgoose", 2)]
FEW_SHOT = [("lorahub", None)]


# per kind of base: (quick, full) settings. The real model trains at batch 8 (its chat-templated rows are
# ~50 tokens; a step takes seconds on one CPU thread), so it takes fewer steps and test prompts, scores
# each expert on its own skill only (its interference shows in the merges; scoring all ten columns cost
# as much as training it), validates on 20 prompts per skill (the card's number; 100 took as long as
# the scoring), and gives the skill it learns slowest (sort_words) three times the steps. Its Fisher
# takes 16 examples per expert, RegMean 64: the Fisher runs a whole-model backward per example (at 64,
# 3.4 of a 19-minute demo; at 32, 2.4 of a 21.6-minute one), RegMean's statistics are batched forwards
# layer by layer. LoraHub's few-shot search takes 24 loss evaluations per task instead of 40 (at 40 it
# took 2.5 of those 21.6 minutes): the demo's 20-minute budget on two cores.
SETTINGS = {
    "tiny": {"steps": (90, 200), "n_eval": (100, 200), "gate_steps": (15, 100), "batch_size": 64, "lr": None,
             "multitask": (1, 3), "expert_scores": "all", "extra_steps": {}, "task_arithmetic": 1.0, "n_val": 100,
             "stats_examples": (64, 256), "fisher_examples": (64, 256), "lorahub_budget": 40},
    "real": {"steps": (40, 40), "n_eval": (20, 30), "gate_steps": (10, 10), "batch_size": 8, "lr": 2e-3,
             "multitask": (2, 3), "expert_scores": "own", "extra_steps": {"sort_words": 3}, "task_arithmetic": 0.4,
             "n_val": 20, "stats_examples": (32, 64), "fisher_examples": (16, 16), "lorahub_budget": 24},
}


def routers() -> tuple[list, str | None]:
    """The routers this installation can run, and a note about any left out."""
    try:
        import nevergrad  # noqa: F401
    except ImportError:
        return ROUTERS, "route:lorahub left out: pip install 'moerge[lorahub]' (nevergrad) to add it"
    return ROUTERS + FEW_SHOT, None


def merge_recipe(method: str, base: Path, experts: dict[str, Path], seed: int = 0, params: dict | None = None,
                 out_dtype: str | None = None) -> dict:
    """A merge of the experts as a recipe: computed in float32, written in ``out_dtype`` (default float32)."""
    params = MERGES[method] if params is None else params
    models = [{"model": f"{base}+{path}", **({"parameters": params} if params else {})} for path in experts.values()]
    # methods without a base (linear, Fisher, RegMean) merge the experts (base+LoRA) alone: a base_model
    # would join them as one more input, as in mergekit

    alone = registry.get(method).base == "ignored"
    return {"merge_method": method, **({} if alone else {"base_model": str(base)}), "models": models,
            "dtype": "float32", **({"out_dtype": out_dtype} if out_dtype else {}), "seed": seed}


def run_demo(out_dir: str | Path = "demo-output", *, quick: bool = False, json_file: str | Path | None = None,
             report_dir: str | Path | None = "demo-report", console: Console | None = None, progress: bool = True,
             skills: list[str] | None = None, base: str | Path | None = None) -> dict:
    quiet_transformers()
    chosen = skills
    console = console or util_console()
    out_dir = Path(out_dir)
    base_dir = base_model.resolve(base)
    base_model.check_model_folder(base_dir, "base")
    kind, tasks, heldout = suite_for(base_dir, quick)
    if chosen:  # the given skills; held out: the composites of two of them
        unknown = [t for t in chosen if t not in suite.SKILLS or suite.SKILLS[t].parts]
        if unknown or len(chosen) < 2:
            raise MoergeError(f"--skills: {', '.join(unknown) or 'give at least two'}; pick two or more skills (not composites) "
                              "from `moerge tasks list`")
        tasks = list(dict.fromkeys(chosen))
        heldout = [h for h in suite.HELDOUT + suite.REAL_HELDOUT if all(p in tasks for p in suite.SKILLS[h].parts)]

    if json_file:
        output_file(json_file, "scoreboard (--json)")
    if report_dir:
        output_file(Path(report_dir) / "scoreboard.png", "report (--report)")
    cfg = SETTINGS[kind]
    pick = 0 if quick else 1
    steps, n_eval, gate_steps = cfg["steps"][pick], cfg["n_eval"][pick], cfg["gate_steps"][pick]
    batch, lr = cfg["batch_size"], cfg["lr"]
    columns = tasks + heldout
    # merges are written in the base's own dtype (a bf16 checkpoint's merges in bf16, as mergekit users
    # publish them), so they are scored in the dtype the base is (moerge.lm.precision)
    import torch

    stored = folder_dtype(base_dir)
    out_dtype = "bfloat16" if stored == torch.bfloat16 else None
    start = time.perf_counter()
    rows: list[dict] = []

    def add_row(name: str, scores: dict[str, float], seconds: float | None = None) -> None:
        rows.append({"model": name, "scores": scores, **means(scores, tasks, heldout),
                     **({"seconds": round(seconds, 1)} if seconds is not None else {})})

    def phase(text: str) -> None:  # one plain line per phase: a log shows where a long run is
        console.print(f"[{time.perf_counter() - start:5.0f} s] {text}", highlight=False, markup=False)

    def score(name: str, model, tok, seconds: float | None = None, on: list[str] | None = None) -> None:
        add_row(name, evaluate(model, tok, on or columns, n=n_eval), seconds)

    phase(f"scoring the base on {len(columns)} tasks ({n_eval} test prompts each)")
    model, tok = base_model.load(base_dir)
    score("base", model, tok)
    experts: dict[str, Path] = {}
    for task in tasks:
        n_steps = steps * cfg["extra_steps"].get(task, 1)
        phase(f"training the {task} expert ({n_steps} steps), then scoring it and training its PHATGOOSE gates")
        path = out_dir / "experts" / task
        card = train_expert(path, base=base_dir, task=task, steps=n_steps, lr=lr, batch_size=batch, overwrite=True,
                            progress=progress, n_val=cfg["n_val"])
        experts[task] = path
        model, tok = load_expert(base_dir, path)
        score(f"expert:{task}", model, tok, card.seconds, on=[task] if cfg["expert_scores"] == "own" else None)
        t0 = time.perf_counter()
        train_gates(path, base=base_dir, steps=gate_steps, batch_size=min(32, batch), progress=progress)  # expert frozen
        console.print(f"trained expert {task}: {card.seconds:.0f} s, validation {card.validation_accuracy:.0%}; "
                      f"its PHATGOOSE gates: {time.perf_counter() - t0:.0f} s", highlight=False)
    for method in MERGES:
        phase(f"merging the experts with {method}, then scoring the merge")
        t0 = time.perf_counter()
        params = dict(MERGES[method], **({"weight": cfg["task_arithmetic"]} if method == "task_arithmetic" else {}))
        recipe = merge_recipe(method, base_dir, experts, params=params, out_dtype=out_dtype)
        if registry.get(method).stats:  # Fisher, RegMean: examples per expert for its statistics
            key = "fisher_examples" if method == "fisher" else "stats_examples"
            recipe["parameters"] = {"num_examples": cfg[key][pick]}
        res = api.merge(recipe, out_dir / "merges" / method, overwrite=True, progress=False)
        model, tok = base_model.load(res.out_dir)
        score(f"merge:{method}", model, tok, time.perf_counter() - t0)
    if LORA_MERGES:
        from moerge.engine.lora_merge import merge_lora
        from moerge.experts.patch import Patched
        from moerge.experts.peft_format import load_adapter
        from moerge.io.source import open_source

        source = open_source(str(base_dir))
        loaded = [load_adapter(p, source) for p in experts.values()]
        model, tok = base_model.load(base_dir)
        patched = Patched(model)
        for method, params in LORA_MERGES.items():
            phase(f"merging the experts into one LoRA with {method} (core space), then scoring it")
            t0 = time.perf_counter()
            patched.apply(merge_lora(loaded, method, params).updates)
            score(f"lora:{method}", model, tok, time.perf_counter() - t0)
    phase(f"training the multitask baseline on all {len(tasks)} skills' data")
    card = train_expert(out_dir / "experts" / "multitask", base=base_dir, task=",".join(tasks),
                        steps=steps * cfg["multitask"][pick], lr=lr, batch_size=batch, overwrite=True, progress=progress,
                        n_val=cfg["n_val"] * len(tasks))
    model, tok = load_expert(base_dir, out_dir / "experts" / "multitask")
    score("multitask", model, tok, card.seconds)
    routing = {}
    available, note = routers()
    for router, top_k in available:
        phase(f"routing with {router}, scoring the routed model")
        t0 = time.perf_counter()
        routed = load_routed(router, experts=list(experts.values()), base=base_dir, top_k=top_k)
        if router == "lorahub":  # loss evaluations of its few-shot search per task (the real model's are costly)
            routed.router.budget = cfg["lorahub_budget"]
        scores, routing[router] = evaluate_routed(routed, columns, n=n_eval)
        add_row("oracle" if router == "oracle" else f"route:{router}", scores, time.perf_counter() - t0)
    if note:
        console.print(note, highlight=False, markup=False)

    board = {"tasks": tasks, "heldout": heldout, "rows": rows, "seconds": round(time.perf_counter() - start, 1),
             "quick": quick, "base": str(base_dir), "suite": kind, "experts": list(experts), "routing": routing,
             "settings": {"dtype": str(compute_dtype(stored)).removeprefix("torch."), "steps": steps, "n_eval": n_eval,
                          "gate_steps": gate_steps, "batch_size": batch, "lr": lr,
                          "extra_steps": cfg["extra_steps"], "expert_scores": cfg["expert_scores"],
                          "task_arithmetic_weight": cfg["task_arithmetic"], "stats_examples": cfg["stats_examples"][pick],
                          "fisher_examples": cfg["fisher_examples"][pick], "lorahub_budget": cfg["lorahub_budget"],
                          "lora_merges": LORA_MERGES}}
    _print(console, board)
    if json_file:
        write_json(json_file, board)
    if report_dir:
        png = plot(board, Path(report_dir) / "scoreboard.png")
        plot_routing(board, Path(report_dir) / "routing.png")
        console.print(f"scoreboard and routing weights drawn in {png.parent}", highlight=False)
    console.print(f"experts in {out_dir}/experts, merges in {out_dir}/merges ({board['seconds']:.0f} s in all)", highlight=False)
    return board


def means(scores: dict[str, float], tasks: list[str], heldout: list[str]) -> dict[str, float | None]:
    """The row means the table, the JSON and the PNG all show: over the seen skills, and over the
    held-out composites (None when there are none). A row scored on some columns only (an expert on
    its own skill) averages those it has."""
    seen, held = [scores[t] for t in tasks if t in scores], [scores[t] for t in heldout if t in scores]
    return {"mean": sum(seen) / len(seen) if seen else None, "mean_heldout": sum(held) / len(held) if held else None}


def _print(console: Console, board: dict) -> None:
    """Tasks down, models across (each skill's own expert in one column), so it fits a terminal;
    the full cross-scores are in the JSON and the PNG."""
    rows = {r["model"]: r["scores"] for r in board["rows"]}
    models = [m for m in rows if not m.startswith("expert:")]
    table = Table(title="moerge demo: exact match on the test split (* held out)")
    table.add_column("task")
    table.add_column("base", justify="right")
    table.add_column("own expert", justify="right")
    for m in models[1:]:
        table.add_column(m.replace("merge:", "").replace("route:", "→").replace("task_arithmetic", "task_arith"), justify="right")
    for t in board["tasks"] + board["heldout"]:
        own = rows.get(f"expert:{t}", {}).get(t)
        table.add_row(t + ("*" if t in board["heldout"] else ""), f"{rows['base'][t]:.0%}",
                      "-" if own is None else f"{own:.0%}", *[f"{rows[m][t]:.0%}" for m in models[1:]])
    full = {r["model"]: r for r in board["rows"]}  # the rows' own means: the JSON's and the PNG's
    seen = board["tasks"]
    table.add_row("[bold]mean seen", f"{full['base']['mean']:.0%}", f"{sum(rows[f'expert:{t}'][t] for t in seen) / len(seen):.0%}",
                  *[f"{full[m]['mean']:.0%}" for m in models[1:]])
    if board["heldout"]:
        table.add_row("[bold]mean held-out*", f"{full['base']['mean_heldout']:.0%}", "-",
                      *[f"{full[m]['mean_heldout']:.0%}" for m in models[1:]])
    console.print(table)


def plot(board: dict, path: Path) -> Path:
    """The scoreboard as a heatmap (rows: models, columns: skills then held-out composites)."""
    plt = pyplot()

    cols = board["tasks"] + board["heldout"]
    heldout = board["heldout"]
    extra = ["mean seen"] + (["mean held-out*"] if heldout else [])
    nan = float("nan")  # a column a row was not scored on: a blank cell
    data = [[r["scores"].get(c, nan) for c in cols] + [nan if r["mean"] is None else r["mean"]]
            + ([nan if r["mean_heldout"] is None else r["mean_heldout"]] if heldout else []) for r in board["rows"]]
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * (len(cols) + len(extra)), 0.8 + 0.4 * len(data)))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.axvline(len(cols) - 0.5, color="white", linewidth=2)
    ax.set_xticks(range(len(cols) + len(extra)), [c + ("*" if c in heldout else "") for c in cols] + extra, rotation=40, ha="right")
    ax.set_yticks(range(len(data)), [r["model"] for r in board["rows"]])
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v != v:
                continue
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, label="exact match")
    ax.set_title("moerge demo scoreboard (* held out)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_routing(board: dict, path: Path) -> Path:
    """Mean routing weight per task (rows) and expert (columns), one panel per router, each with its
    colour bar: weights in [0, 1] on one scale, LoraHub's (which may be negative) centred on 0."""
    plt = pyplot()

    routers = list(board["routing"])
    cols = board["tasks"] + board["heldout"]
    experts = board["experts"]
    ncols = min(4, len(routers))
    nrows = -(-len(routers) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 + (1.4 + 0.45 * len(experts)) * ncols, (1.2 + 0.32 * len(cols)) * nrows),
                             squeeze=False)
    for ax in axes.flat[len(routers):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, routers):
        data = [board["routing"][r][t] for t in cols]
        low = min(min(row) for row in data)
        if low < 0:  # LoraHub's weights may be negative: a diverging scale centred on 0
            top = max(1.0, -low, max(max(row) for row in data))
            im = ax.imshow(data, vmin=-top, vmax=top, cmap="coolwarm", aspect="auto")
        else:
            im = ax.imshow(data, vmin=0, vmax=1, cmap="magma", aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03).ax.tick_params(labelsize=8)
        ax.set_title(r, fontsize=11)
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=9)
        ax.set_yticks(range(len(cols)), [c + ("*" if c in board["heldout"] else "") for c in cols], fontsize=9)
        ax.set_xlabel("expert", fontsize=9)
    fig.suptitle("mean routing weight: task (rows, * held out) -> expert (columns)", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)
