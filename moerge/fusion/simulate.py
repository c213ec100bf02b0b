"""ColD Fusion, simulated end to end on one machine (or a Ray cluster): rounds of contributors
fine-tuning the current base, fused into the next base, each new base evaluated two ways.

Each round, K contributors each draw a task from the pool and fine-tune the current base on it (a full
fine-tune, as in the paper, or an adapter); their contributions go into a real library and are fused
into the next base version by ``moerge fuse`` (the average by default). The new base is then scored

- zero-shot on every task of the pool (the mean over the tasks seen so far is the ``seen`` curve), and
- as a starting point: a short fine-tune on each held-out task (never contributed), scored after
  (``heldout_finetuned``), compared with the same short fine-tune from the original base. This is the
  paper's claim: the fused model is a better starting point for unseen tasks.
- with ``seen_finetune``, also as a starting point for the tasks seen so far (``seen_finetuned``, and
  the original base's ``seen_finetuned_original``): the paper measures seen datasets this way, since
  its fused body keeps no task heads; zero-shot ``seen`` is the stricter test.

Contributors' fine-tunes and the held-out fine-tunes of a round are independent jobs: they run one
after another, or as Ray tasks with ``ray=`` (``True``/``"local"`` starts a local Ray; an address joins a
cluster). Both paths call the same functions.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from moerge.errors import MoergeError
from moerge.eval import evaluate, resolve_tasks
from moerge.experts.card import ADAPTERS, ALIASES
from moerge.fusion.fuse import check_method, fuse, fusion_recipe, rescore
from moerge.library import Library
from moerge.lm import base as base_model
from moerge.tasks import skills
from moerge.tasks.suites import suite_for
from moerge.train.expert import load_expert, train_expert
from moerge.util.figures import check_figure, pyplot, save_figure
from moerge.util.files import atomic_dir, check_output_dir, output_file, write_json
from moerge.util.progress import quiet_transformers
from moerge.util.scale import Runner
from moerge.util.threads import set_threads


def _finetune_and_score(base_dir: str, out_dir: str, task: str, adapter: str, steps: int, batch_size: int, seed: int,
                        eval_tasks: list[str], n_eval: int, keep: bool, threads: int | None, lr: float | None = None) -> dict:
    """One job: fine-tune ``base_dir`` on ``task``, score the result on ``eval_tasks``. Runs in this
    process or in a Ray worker (everything it needs is in its arguments)."""
    if threads:
        set_threads(threads)
    quiet_transformers()
    t0 = time.perf_counter()
    card = train_expert(out_dir, base=base_dir, task=task, adapter=adapter, steps=steps, lr=lr, batch_size=batch_size,
                        seed=seed, overwrite=True, progress=False)
    scores = {}
    if eval_tasks:
        model, tok = load_expert(base_dir, out_dir)
        scores = evaluate(model, tok, eval_tasks, n=n_eval)
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"task": task, "path": out_dir if keep else None, "validation": card.validation_accuracy,
            "seconds": round(time.perf_counter() - t0, 1), "scores": scores}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def task_sets(base, tasks: list[str] | None, heldout: list[str] | None) -> tuple[list[str], list[str]]:
    """(the contributors' pool, the held-out tasks). By default the pool is the suite of the base's kind,
    as the demo picks it (a chat model gets the real-model suite), and the held-out tasks are the
    composites of two pool skills, from either suite."""
    if not tasks:

        folder = base_model.resolve(base)
        base_model.check_model_folder(folder, "base")
        tasks = suite_for(folder, quick=False)[1]
    pool = resolve_tasks(tasks)
    held = resolve_tasks(heldout) if heldout is not None else [h for h in skills.HELDOUT + skills.REAL_HELDOUT
                                                               if all(p in pool for p in skills.SKILLS[h].parts)]
    return pool, held


def simulate(out_dir: str | Path = "fusion-output", *, rounds: int = 5, contributors: int = 4,
             tasks: list[str] | None = None, heldout: list[str] | None = None, adapter: str = "full",
             method: str = "average", steps: int = 100, finetune_steps: int = 40, batch_size: int = 32,
             n_eval: int = 100, seed: int = 0, base: str | Path | None = None, ray: bool | str | None = None,
             json_file: str | Path | None = None, plot_file: str | Path | None = None, console=None,
             overwrite: bool = False, parameters: dict | None = None, lr: float | None = None,
             seen_finetune: bool = False) -> dict:
    """Run the loop (module doc) and return the results: ``{"original": {...}, "rounds": [...]}``.
    ``lr`` is the contributors' learning rate (default: the adapter's usual one); the held-out
    fine-tunes always use the usual one, so every base is measured the same way.

    The workspace ``out_dir`` (a library holding every base version, and ``curves.png`` unless
    ``plot_file`` says otherwise) is built under a temporary name and appears when the run is
    complete; with ``overwrite`` an earlier run's folder is replaced only then."""
    quiet_transformers()
    adapter = ALIASES.get(adapter, adapter)
    if adapter not in ADAPTERS:
        raise MoergeError(f"--adapter {adapter!r}: use one of {', '.join(ADAPTERS)}")
    for name, v, low in (("--rounds", rounds, 1), ("--contributors", contributors, 1), ("--steps", steps, 1),
                         ("--finetune-steps", finetune_steps, 1), ("--n-eval", n_eval, 1), ("--batch-size", batch_size, 1)):
        if v < low:
            raise MoergeError(f"{name} must be at least {low}, got {v}")
    if lr is not None and not (0 < lr < 1):
        raise MoergeError(f"--lr must be in (0, 1), got {lr}")
    check_method(method)
    if tasks is not None and not tasks:
        raise MoergeError("--tasks: empty; give the contributors' tasks, comma-separated, or leave it out")
    pool, held = task_sets(base, tasks, heldout)
    clash = [t for t in held if t in pool]
    if clash:
        raise MoergeError(f"--heldout {clash[0]}: is also a contributor task; held-out tasks must never be contributed")
    out = check_output_dir(Path(out_dir).absolute(), overwrite)  # absolute: Ray workers may run elsewhere
    if out.exists() and overwrite and any(out.iterdir()):
        if not (out / "library" / "library.json").is_file():  # --overwrite replaces an earlier run, nothing else
            raise MoergeError(f"{out}: is not the output of an earlier `moerge fuse simulate` (no library/ inside); "
                              "choose a new folder")
    if json_file:
        output_file(json_file, "results (--json)")
    if plot_file:

        check_figure(plot_file, "curves (--plot)")
    base_dir = base_model.resolve(base)
    base_model.check_model_folder(base_dir, "base")
    # the fusion's recipe and --param, checked now rather than after the first round's fine-tunes
    fusion_recipe(check_method(method), [f"library://contribution{k}" for k in range(contributors)], base_dir,
                  dict(parameters or {}))
    say = (lambda text: console.print(text, highlight=False, markup=False)) if console is not None else (lambda text: None)
    start = time.perf_counter()

    runner = Runner(_finetune_and_score, ray)
    try:
        with atomic_dir(out, overwrite) as work:
            results = _loop(runner, work, base_dir, pool, held, rounds, contributors, adapter, method, steps,
                            finetune_steps, batch_size, n_eval, seed, ray, say, start, parameters or {}, lr,
                            seen_finetune)
            plot(results, work / "curves.png")
    finally:
        runner.close()
    results["library"] = str(out / "library")
    if json_file:
        write_json(json_file, results)
    if plot_file:
        plot(results, Path(plot_file))
    return results


def _loop(runner, out, base_dir, pool, held, rounds, contributors, adapter, method, steps, finetune_steps, batch_size,
          n_eval, seed, ray, say, start, parameters: dict, lr: float | None = None, seen_finetune: bool = False) -> dict:
    lib = Library.init(out / "library", base_dir)
    rng = random.Random(seed)

    def finetune_jobs(from_dir: Path, tag: str, tasks: list[str] = held) -> list[dict]:
        return [dict(base_dir=str(from_dir), out_dir=str(out / "work" / f"{tag}-{h}"), task=h, adapter=adapter,
                     steps=finetune_steps, batch_size=batch_size, seed=seed * 7919 + i, eval_tasks=[h], n_eval=n_eval,
                     keep=False) for i, h in enumerate(tasks)]

    def finetuned(from_dir: Path, tag: str, tasks: list[str]) -> dict[str, float]:
        return {r["task"]: r["scores"][r["task"]] for r in runner.map(finetune_jobs(from_dir, tag, tasks))}

    def zero_shot(folder: Path) -> dict[str, float]:
        model, tok = base_model.load(folder)
        return evaluate(model, tok, pool, n=n_eval)

    say(f"[{time.perf_counter() - start:5.0f} s] scoring the original base on {len(pool)} tasks and fine-tuning it on "
        f"{len(held)} held-out task(s) ({finetune_steps} steps each)")
    orig_scores = zero_shot(base_dir)
    orig_held = finetuned(base_dir, "r0", held)
    original = {"seen": _mean(orig_scores.values()), "all": _mean(orig_scores.values()),
                "heldout_finetuned": _mean(orig_held.values()), "scores": orig_scores, "heldout": orig_held}
    orig_seen_ft: dict[str, float] = {}
    if seen_finetune:  # the original base fine-tuned on every pool task: each round compares with its seen ones
        say(f"[{time.perf_counter() - start:5.0f} s] fine-tuning the original base on the {len(pool)} contributor tasks")
        orig_seen_ft = finetuned(base_dir, "r0-seen", pool)
        original["seen_finetuned"] = _mean(orig_seen_ft.values())
        original["finetuned"] = orig_seen_ft
    results: dict = {"original": original, "rounds": [], "pool": pool, "heldout_tasks": held,
                     "settings": {"rounds": rounds, "contributors": contributors, "adapter": adapter, "method": method,
                                  "steps": steps, "finetune_steps": finetune_steps, "batch_size": batch_size,
                                  "n_eval": n_eval, "seed": seed, "base": str(base_dir), "ray": bool(ray),
                                  "parameters": parameters, "lr": lr, "seen_finetune": seen_finetune}}
    seen: list[str] = []
    current = lib.base()
    for r in range(1, rounds + 1):
        drawn = rng.sample(pool, contributors) if contributors <= len(pool) else [rng.choice(pool) for _ in range(contributors)]
        say(f"[{time.perf_counter() - start:5.0f} s] round {r}: {contributors} contributor(s) fine-tune {current.ref} on "
            f"{', '.join(drawn)} ({steps} steps each)")
        jobs = [dict(base_dir=str(current.path), out_dir=str(out / "contributions" / f"round{r}" / f"{k}-{t}"), task=t,
                     adapter=adapter, steps=steps, batch_size=batch_size, seed=seed * 1000 + r * 100 + k, eval_tasks=[],
                     n_eval=n_eval, keep=True, lr=lr) for k, t in enumerate(drawn)]
        done = runner.map(jobs)
        refs = []
        for k, (job, res) in enumerate(zip(jobs, done)):
            entry = lib.add(job["out_dir"], f"r{r}-c{k}-{res['task']}", task=res["task"], contributor=f"contributor-{k}")
            refs.append(entry.ref)
        for t in drawn:
            if t not in seen:
                seen.append(t)
        fused = fuse(lib, method=method, experts=refs, parameters=parameters)
        current = fused.base
        for job in jobs:  # contributions live on in the library; the training folders are scratch
            shutil.rmtree(job["out_dir"], ignore_errors=True)
        say(f"[{time.perf_counter() - start:5.0f} s] round {r}: fused into {current.ref}; scoring it zero-shot and as a "
            "starting point")
        scores = zero_shot(current.path)
        held_scores = finetuned(current.path, f"r{r}", held)
        row = {"round": r, "base": current.ref, "contributors": [{"task": x["task"], "expert": ref, "validation": x["validation"],
                                                                   "seconds": x["seconds"]} for x, ref in zip(done, refs)],
               "seen_tasks": list(seen), "seen": _mean(scores[t] for t in seen),
               "seen_original": _mean(orig_scores[t] for t in seen), "all": _mean(scores.values()),
               "heldout_finetuned": _mean(held_scores.values()), "scores": scores, "heldout": held_scores}
        recorded = {"zero_shot": scores, "heldout_finetuned": held_scores}
        if seen_finetune:
            seen_ft = finetuned(current.path, f"r{r}-seen", seen)
            row.update(seen_finetuned=_mean(seen_ft.values()), seen_finetuned_original=_mean(orig_seen_ft[t] for t in seen),
                       finetuned=seen_ft)
            recorded["seen_finetuned"] = seen_ft
        results["rounds"].append(row)
        rescore(lib, current.version, recorded)
        say(f"round {r}: seen {row['seen']:.1%} (original {row['seen_original']:.1%})"
            + (f", seen after fine-tuning {_fmt(row['seen_finetuned'])} (original {_fmt(row['seen_finetuned_original'])})"
               if seen_finetune else "")
            + f", held-out after fine-tuning {_fmt(row['heldout_finetuned'])} (original {_fmt(original['heldout_finetuned'])})")
    shutil.rmtree(out / "work", ignore_errors=True)
    shutil.rmtree(out / "contributions", ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def table(results: dict):
    """The rounds as a rich Table."""
    from rich.table import Table

    o = results["original"]
    ft = "seen_finetuned" in o
    t = Table("round", "base", "contributors", "seen tasks (zero-shot)", "original on them", "all tasks",
              *(["seen after fine-tune", "original, same"] if ft else []), "held-out after fine-tune",
              title="ColD Fusion rounds")
    t.add_row("0", "base@1", "", "", "", _fmt(o["seen"]), *(["", ""] if ft else []), _fmt(o["heldout_finetuned"]))
    for r in results["rounds"]:
        t.add_row(str(r["round"]), r["base"], ", ".join(c["task"] for c in r["contributors"]), _fmt(r["seen"]),
                  _fmt(r["seen_original"]), _fmt(r["all"]),
                  *([_fmt(r["seen_finetuned"]), _fmt(r["seen_finetuned_original"])] if ft else []),
                  _fmt(r["heldout_finetuned"]))
    return t


def plot(results: dict, path: Path) -> Path:
    """Curves over rounds: mean zero-shot accuracy on the pool's tasks and on those seen so far, and the
    held-out tasks' accuracy after a short fine-tune; the original base's values as dashed lines."""
    plt = pyplot()
    rounds = [0] + [r["round"] for r in results["rounds"]]
    o = results["original"]
    allv = [o["seen"]] + [r["all"] for r in results["rounds"]]
    seenv = [None] + [r["seen"] for r in results["rounds"]]
    held = [o["heldout_finetuned"]] + [r["heldout_finetuned"] for r in results["rounds"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(rounds, allv, "o-", label="zero-shot, all contributor tasks")
    ax.plot(rounds[1:], seenv[1:], "s-", label="zero-shot, tasks seen so far")
    if "seen_finetuned" in o:
        ax.plot(rounds[1:], [r["seen_finetuned"] for r in results["rounds"]], "D-",
                label="seen tasks after a short fine-tune")
        ax.plot(rounds[1:], [r["seen_finetuned_original"] for r in results["rounds"]], ":", color="C3",
                label="original base, same fine-tune on them")
    if o["heldout_finetuned"] is not None:
        ax.plot(rounds, held, "^-", label="held-out tasks after a short fine-tune")
        ax.axhline(o["heldout_finetuned"], color="C2", linestyle="--", linewidth=1, label="original base, same fine-tune")
    ax.set_xlabel("fusion round (0: the original base)")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.set_xticks(rounds)
    ax.legend(fontsize=8)
    ax.set_title("ColD Fusion: the fused base, round by round")
    fig.tight_layout()
    return save_figure(fig, path)
