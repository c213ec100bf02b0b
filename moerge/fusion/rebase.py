"""Re-apply an expert made on an older base of a library to a newer one, so a contributor need not
retrain after every fusion round.

What carries over is the expert's *change*: an adapter's factors (LoRA, DoRA, (IA)³) are kept as they
are and now apply to the new base; a full fine-tune's delta (its tensors minus the old base's) is added
to the new base's tensors. The result is stored as the next version of the expert, made on the new
base. How much of its skill survives is measured, not assumed: when its task is a built-in skill or
its card names its JSONL data, the expert is scored on that task on the old base and on the new one.

Carried factors often do not survive a fused base (on the real model a title-case expert kept a fifth
of its skill): the base moved under them. Where the expert's data is at hand, a carried expert that
keeps less than ``keep`` (90 %) of its score is *re-fitted*: trained further on the new base, from its
own weights, a quarter of the steps it was trained for at a time until its validation score is back
where it was (at most its own training steps), and scored again.
Its task centroids are recorded again on the new base, so task-level routers can route to it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moerge.errors import MoergeError
from moerge.experts.card import CARD, ExpertCard, read_card
from moerge.experts.embed import with_task_embedding
from moerge.experts.peft_format import load_expert_folder
from moerge.io.source import open_source
from moerge.library import Library
from moerge.lm.generate import exact_match
from moerge.tasks import examples, skills
from moerge.tasks.data import read_jsonl, split_of
from moerge.tasks.training_data import split_user_data, training_rows
from moerge.train.expert import load_expert, refit_expert


@dataclass
class RebaseResult:
    entry: object  # the new library Entry
    source: str  # what was rebased: NAME@V or a folder
    from_version: int
    to_version: int
    task: str | None
    before: float | None  # exact match on its task, on the old base
    after: float | None  # ... on the new base (after the re-fit, if there was one)
    carried: float | None = None  # ... on the new base with its factors carried over as they were
    refit_steps: int = 0  # steps of training on the new base (0: carried as it was)
    notes: tuple[str, ...] = ()

    @property
    def retained(self) -> float | None:
        if self.before is None or self.after is None or self.before == 0:
            return None
        return self.after / self.before


def _eval_rows(task: str | None, card: dict, n: int, split: str = "test") -> tuple[list | None, str | None]:
    """(rows of ``split`` for the expert's task, why there are none): those of the JSONL data its card
    names (a user's file holds out about one prompt in ten for each of validation and test), else a
    built-in skill's. The card's own data comes first: a user's task may share a built-in skill's name."""
    data = str(card.get("data") or "")
    if data and not data.startswith("moerge:"):
        if not Path(data).is_file():
            return None, f"its data {data} is not here"
        held = [r for r in read_jsonl(data) if split_of(r.prompt) != "train"]
        rows = [r for r in held if split_of(r.prompt) == split] or held  # too few rows: one held-out set for both
        return rows[:n] or None, None if rows else f"{data} holds out no rows to score it on"
    if task and all(t in skills.SKILLS for t in task.split(",")):
        names = task.split(",")
        return [r for t in names for r in examples(t, split, max(1, n // len(names)))], None
    return None, "its task is not a built-in skill and its card names no JSONL data"


def _score(base_dir: Path, expert_dir: Path, rows) -> float:
    model, tok = load_expert(base_dir, expert_dir)
    return exact_match(model, tok, rows)


def _train_rows(card: dict, n: int, seed: int) -> tuple[list, str | None]:
    """(rows to re-fit on, why there are none): the expert's own training data, found from its card."""
    try:
        rows = training_rows(ExpertCard(**{k: v for k, v in card.items() if k in ExpertCard.__dataclass_fields__}), n, seed)
    except MoergeError as e:
        return [], str(e)
    except TypeError:
        return [], "its card is not an expert card of `moerge expert train`"
    if not str(card.get("data", "")).startswith("moerge:"):
        rows = split_user_data(rows)[0]  # a user's JSONL: never its held-out rows
    return rows, None


REFIT_KEEP = 0.9  # a carried expert keeping less than this share of its score is re-fitted
REFIT_SHARE = 4  # ... in chunks of 1/REFIT_SHARE of the steps it was trained for (at least REFIT_MIN)
REFIT_MIN = 20


def rebase(library, expert: str | Path, *, to: int | None = None, name: str | None = None, n_eval: int = 100,
           evaluate: bool = True, refit: bool = True, refit_steps: int | None = None, keep: float = REFIT_KEEP,
           seed: int = 0) -> RebaseResult:
    """Store ``expert`` (``NAME[@V]`` of the library, or an adapter folder made on one of its bases) as
    the next version of ``name`` (default: its own name) made on base@``to`` (default: the latest).

    With ``evaluate``, it is scored on its task on both bases; with ``refit`` as well, a carried expert
    keeping less than ``keep`` of its score is trained further on the new base from its own weights,
    on its own data, ``refit_steps`` steps at a time (default: a quarter of its training steps, at
    least 20) until it has its whole validation score back, for at most as many steps as it was
    trained for, and scored again. Whether to re-fit is read from the carried expert's test score (the
    one reported); when to stop, from validation rows, so the score reported was not chosen on.
    ``refit_steps`` given without ``evaluate`` re-fits that many steps once, without measuring."""
    if not 0 < keep <= 1:
        raise MoergeError(f"--keep {keep:g}: give the share of its score a carried expert must keep, in (0, 1] "
                          "(or --no-refit)")
    if refit_steps is not None and refit_steps < 1:
        raise MoergeError(f"--refit-steps {refit_steps}: give a positive number of steps (or --no-refit)")
    if refit_steps is not None and not refit:
        raise MoergeError(f"--refit-steps {refit_steps} with --no-refit: give one or the other")
    if evaluate and n_eval < 1:
        raise MoergeError(f"--n-eval {n_eval}: give at least 1 test prompt (or --no-eval)")
    lib = library if isinstance(library, Library) else Library.open(library)
    target = lib.base(to)
    with tempfile.TemporaryDirectory(prefix="moerge-rebase-") as d:
        folder = Path(expert)
        if not str(expert).startswith("library://") and not folder.is_dir() and ("/" in str(expert) or folder.exists()):
            raise MoergeError(f"{expert}: no such expert folder (give a folder made on one of {lib.root}'s bases, or "
                              "a library expert's NAME[@V])")
        if folder.is_dir():  # an adapter folder made on one of the library's bases
            card = read_card(folder)
            made_on = card.get("base_fingerprint")
            old = lib.version_of(made_on) if made_on else None
            if old is None:
                raise MoergeError(f"{folder}: its card does not name a base of {lib.root} (fingerprint "
                                  f"{made_on or 'missing'}); only experts made on one of its bases can be rebased")
            src_dir, label, name = folder, str(folder), name or folder.name
            kind = load_expert_folder(folder, lib.base_source(old.version)).kind
        else:
            entry = lib.get(str(expert).removeprefix("library://"))
            old = lib.base(entry.base_version)
            src_dir = lib.export(entry.ref, Path(d) / "old")
            card, label, name, kind = read_card(src_dir), entry.ref, name or entry.name, entry.kind
        if old.version == target.version:
            raise MoergeError(f"{label}: is already made on {target.ref}; nothing to rebase")
        if old.version > target.version:
            raise MoergeError(f"{label}: is made on {old.ref}, newer than {target.ref}; rebase only moves forward")
        new_dir = Path(d) / "new"
        new_dir.mkdir()
        if kind == "full":
            _rebase_full(src_dir, new_dir, lib, old, target)
        else:  # adapter factors apply as they are: only the base they name changes (card and PEFT config)
            for f in src_dir.iterdir():
                if f.is_file() and f.name != CARD:
                    (new_dir / f.name).write_bytes(f.read_bytes())
            config = new_dir / "adapter_config.json"
            if config.is_file():
                cfg = json.loads(config.read_text())
                cfg["base_model_name_or_path"] = str(target.path.absolute())
                config.write_text(json.dumps(cfg, indent=2) + "\n")
        lineage = dict(card.get("rebased") or {})
        new_card = dict(card) | {"base": str(target.path.absolute()), "base_fingerprint": target.fingerprint,
                                 "rebased": {"from": label, "from_base": old.ref, "to_base": target.ref,
                                             "earlier": lineage or None}}
        # computed on the old base, or validated there: not true of the rebased expert
        for k in ("centroid", "centroids", "centroid_base", "library_ref", "validation_accuracy"):
            new_card.pop(k, None)
        (new_dir / CARD).write_text(json.dumps(new_card, indent=2) + "\n")
        task = card.get("task")
        notes, steps = [], 0
        rows, unmeasured = _eval_rows(task, card, n_eval) if evaluate else (None, None)
        if unmeasured:
            notes.append(f"not measured: {unmeasured}")
        before = after = carried = None
        if rows:
            before = _score(old.path, src_dir, rows)
            after = carried = _score(target.path, new_dir, rows)
            new_card["rebased"] |= {"exact_match_before": before, "exact_match_after": after, "test_prompts": len(rows)}
        train_rows, why_not = _train_rows(card, 3000, seed)  # to re-fit on, and its prompts for the centroids
        wanted = refit and (refit_steps is not None if before is None else after < keep * before)
        if wanted and not train_rows:
            notes.append(f"not re-fitted: {why_not or 'no training rows'}")
        elif wanted:
            chunk = refit_steps or max(REFIT_MIN, int(card.get("steps") or 0) // REFIT_SHARE)
            most = max(chunk, int(card.get("steps") or 0)) if rows else chunk
            val = _eval_rows(task, card, n_eval, "validation")[0] if rows else None
            goal = _score(old.path, src_dir, val) if val else None  # its whole score back, not just the bar
            history: list[float] = []

            def back(model, tok) -> bool:  # its validation score after each chunk, in the model as trained
                history.append(exact_match(model, tok, val))
                return history[-1] >= goal

            steps, loss = refit_expert(new_dir, target.path, train_rows, steps=chunk, most=most,
                                       stop=back if goal is not None else None, lr=card.get("lr"),
                                       batch_size=int(card.get("batch_size") or 64), seed=seed)
            new_card["rebased"] |= {"refit_steps": steps, "refit_final_loss": round(loss, 4)}
            if history:  # the validation scores after each chunk, and the old base's it aimed at
                new_card["rebased"] |= {"refit_validation": history, "refit_goal_validation": goal}
            if rows:
                after = _score(target.path, new_dir, rows)
                new_card["rebased"] |= {"exact_match_carried": carried, "exact_match_after": after}
                if after < keep * before:
                    why = " (as many as it was trained for)" if steps >= most else ""
                    notes.append(f"still below {keep:.0%} of its test score after {steps} steps of re-fitting{why}; "
                                 "re-fit longer (--refit-steps N), or retrain it on the new base")
        if train_rows:  # routers find it on the new base
            new_card, _ = with_task_embedding(new_card, [r.prompt for r in train_rows[:256]], base=target.path)
        else:
            notes.append(f"no task centroids on {target.ref} ({why_not}); task-level routers cannot route to it until "
                         f"they are recorded: moerge library export {name} DIR, moerge expert embed DIR --prompts FILE "
                         f"--base {target.path}, then add DIR back")
        if notes:
            new_card["rebased"]["notes"] = notes
        (new_dir / CARD).write_text(json.dumps(new_card, indent=2) + "\n")
        entry = lib.add(new_dir, name, task=task, source=f"{label} rebased from {old.ref} to {target.ref}")
    return RebaseResult(entry, label, old.version, target.version, task, before, after, carried, steps, tuple(notes))


def _rebase_full(src: Path, dst: Path, lib, old, target) -> None:
    """A full fine-tune's model folder moved to ``target``: new base + (fine-tune - old base), per tensor."""
    from safetensors.torch import save_file

    ft, a, b = open_source(src), lib.base_source(old.version), lib.base_source(target.version)
    out = {}
    for n in b.names():
        t = b.get(n)
        if n in ft and n in a and t.is_floating_point():
            delta = ft.get(n).float() - a.get(n).float()
            t = (t.float() + delta).to(t.dtype) if delta.any() else t
        out[n] = t.contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in target.path.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja") and not f.name.endswith(".index.json") \
                and not f.name.startswith("moerge_"):
            (dst / f.name).write_bytes(f.read_bytes())
