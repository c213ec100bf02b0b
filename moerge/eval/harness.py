"""The lm-evaluation-harness bridge: any model moerge can run, scored on lm-eval's tasks.

lm-eval is how the field reports numbers, so a merge, an expert or a routed model should be scored
there with no export step. This module hands lm-eval one of its own ``HFLM`` models built around
the model object moerge already holds: a model folder, a base with an adapter (a PEFT model), or a
routed model (``RoutedModel``), whose router picks the experts for each batch before lm-eval's own
forward and ``generate`` run on the base (``MoergeLM``). lm-eval keeps all of its semantics: task
configs, prompts, few-shot, filters, metrics.

Tasks are lm-eval's registry names (``hellaswag``, ``arc_easy``; their data comes from the hub) or
the user's own task YAML files and folders of them, which lm-eval reads offline (for example a
``dataset_path: json`` task over a local JSONL file). Prompts are encoded the way moerge trains:
bos + text for the built-in base (``bos_tokenizer``), the chat template for chat models
(lm-eval's ``apply_chat_template``).

Elsewhere, ``lm-eval:TASK`` items in ``moerge eval --tasks`` and ``moerge merge --eval`` score a
model by each task's first metric (``primary``), next to the built-in skills.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moerge.errors import MoergeError
from moerge.lm.chat import bos_tokenizer, uses_chat

PREFIX = "lm-eval:"  # marks an lm-eval task among moerge's own task names (``--tasks``, ``--eval``)
INSTALL = "pip install 'moerge[lm-eval]'"


def is_lm_eval(item: str) -> bool:
    return item.startswith(PREFIX)


def split_items(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)


@dataclass
class Tasks:
    """What lm-eval is asked for: registry names and the user's YAML task names, with the folders
    lm-eval indexes for the latter."""

    names: list[str]
    include: list[str]
    registry: bool  # some names come from lm-eval's registry (indexing it takes ~10 s)
    given: dict[str, str] = field(default_factory=dict)  # task name -> how the user wrote it
    _manager: object = field(default=None, repr=False, compare=False)

    def manager(self):
        """lm-eval's TaskManager over these tasks (built once: indexing the registry takes ~10 s)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_path=self.include or None, include_defaults=self.registry)
        return self._manager


def _require() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MoergeError(f"lm-eval tasks need the lm-evaluation-harness: {INSTALL}") from None


def _yaml_tasks(path: Path) -> list[str]:
    """The ``task:`` names a task YAML (or a folder of them) defines; lm-eval's ``!function`` tags and
    other custom tags are read as nothing (only the name matters here)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    names = []
    for f in files:
        try:
            doc = yaml.load(f.read_text(), Loader=Loader)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise MoergeError(f"{f}: not a readable lm-eval task YAML ({where}{what}); fix it") from None
        if isinstance(doc, dict):
            task = doc.get("task") or doc.get("group")
            if isinstance(task, str) and "task" in doc and "include" not in doc:
                lacks = [k for k in ("dataset_path", "doc_to_text") if k not in doc]
                if lacks:
                    raise MoergeError(f"{f}: task {task} has no {' and no '.join(lacks)}; an lm-eval task YAML needs "
                                      "dataset_path, doc_to_text and doc_to_target (or `include:` a template that has them)")
            _check_metrics(f, task, doc.get("metric_list"))
            names += [task] if isinstance(task, str) else [t for t in (task or []) if isinstance(t, str)]
    if not names:
        raise MoergeError(f"{path}: defines no lm-eval task (no `task:` name); see lm-eval's task guide")
    return names


def _check_metrics(f: Path, task, metric_list) -> None:
    """A metric name lm-eval does not know (a typo) is refused with the close ones; a Hugging Face
    ``evaluate`` metric is marked ``hf_evaluate: true`` in lm-eval's YAML and left to it."""
    import difflib

    import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import METRIC_REGISTRY

    for entry in metric_list if isinstance(metric_list, list) else []:
        name = entry.get("metric") if isinstance(entry, dict) else None
        if isinstance(name, str) and name not in METRIC_REGISTRY and not entry.get("hf_evaluate"):
            hints = difflib.get_close_matches(name, list(METRIC_REGISTRY), n=2)
            raise MoergeError(f"{f}: task {task} asks for unknown metric {name}" + (f" (close: {', '.join(hints)})" if hints else "")
                              + "; fix its metric_list (or add `hf_evaluate: true` for a Hugging Face evaluate metric)")


def resolve(spec) -> Tasks:
    """Check ``spec`` (comma-separated; each item a registry name, a task YAML or a folder of them,
    with or without the ``lm-eval:`` prefix) before any model is loaded: a missing file or an unknown
    name is one line naming it."""
    _require()
    names, include, registry, given = [], [], False, {}
    for raw in split_items(spec):
        item = (raw[len(PREFIX):] if is_lm_eval(raw) else raw).strip()
        if not item:
            raise MoergeError(f"{raw!r} names no lm-eval task; write lm-eval:TASK (a registry name) or lm-eval:path/to/task.yaml")
        path = Path(item)
        if item.endswith((".yaml", ".yml")) or path.is_dir() or os.sep in item:
            if not path.exists():
                raise MoergeError(f"{item}: no such lm-eval task file or folder; check the path")
            found = _yaml_tasks(path)
            folder = str((path if path.is_dir() else path.parent).resolve())
            if folder not in include:
                include.append(folder)
        else:
            found, registry = [item], True
        for n in found:
            if n not in names:
                names.append(n)
                given[n] = raw
    if not names:
        raise MoergeError("no lm-eval tasks given; name them (e.g. arc_easy) or give task YAML files")
    tasks = Tasks(names, include, registry, given)
    if registry:  # a registry name is checked against the index (the user's YAML names are known to exist)
        with _quiet():
            known = set(tasks.manager().all_tasks)
        unknown = [n for n in names if n not in known]
        if unknown:
            import difflib

            hints = [m for n in unknown for m in difflib.get_close_matches(n, known, n=3)]
            raise MoergeError(f"lm-eval has no task {', '.join(unknown)}" + (f" (close: {', '.join(hints)})" if hints else "")
                              + "; see `lm-eval ls tasks`, or give the path of your own task YAML")
    for name in names:
        _check(tasks, name)
    return tasks


def _why(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:240]
    return f"{first} ({type(e).__name__})" if first and first != "None" else type(e).__name__


def _leaves(d: dict):
    for v in d.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def _check(tasks: Tasks, name: str) -> None:
    """Build one task as lm-eval will (its data loaded, its metrics found) and render its first
    example, so a broken YAML is one line naming the task and what to fix before any model is loaded
    (and before a merge that ``--eval`` scores is written). Metric names are checked in the YAML
    (``_check_metrics``); one from a template elsewhere fails here, in lm-eval's own loading."""
    from lm_eval.tasks import get_task_dict

    given = tasks.given.get(name, name)
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):
        try:
            built = get_task_dict([name], tasks.manager())
        except Exception as e:
            import jinja2

            if isinstance(e, jinja2.TemplateError):  # lm-eval renders an example while it builds the task
                raise MoergeError(f"{given}: task {name} cannot render its first example ({_why(e)}); check its "
                                  "doc_to_text, doc_to_target and doc_to_choice against the data's fields") from None
            raise MoergeError(f"{given}: lm-eval cannot load task {name}: {_why(e)}; check its dataset_path and "
                              "dataset_kwargs (data_files) and its metric_list") from None
        for task in _leaves(built):
            try:
                docs = task.eval_docs
                doc = docs[0] if len(docs) else None
            except Exception as e:
                raise MoergeError(f"{given}: task {name} has no evaluation split it can read ({_why(e)}); set its "
                                  "test_split (or validation_split) to a split of its data") from None
            if doc is None:
                raise MoergeError(f"{given}: task {name} has no examples in its evaluation split; check its data")
            try:
                task.doc_to_text(doc)
                task.doc_to_target(doc)
                if getattr(task, "OUTPUT_TYPE", None) == "multiple_choice" or task.config.output_type == "multiple_choice":
                    task.doc_to_choice(doc)
            except Exception as e:
                fields = ", ".join(map(str, doc.keys())) if hasattr(doc, "keys") else "?"
                raise MoergeError(f"{given}: task {name} cannot render its first example ({_why(e)}); check its "
                                  f"doc_to_text, doc_to_target and doc_to_choice against the data's fields ({fields})") from None


@contextlib.contextmanager
def _quiet(progress: bool = False):
    """lm-eval and datasets log every step at INFO and draw bars: keep warnings, and the bars only on a
    terminal when progress is asked for. lm-eval also records the git commit of the current folder
    by running ``git describe``, which prints ``fatal: not a git repository`` outside one; moerge
    records what it evaluated itself, so that lookup is skipped while lm-eval runs."""
    import datasets
    import lm_eval.evaluator

    logger = logging.getLogger("lm_eval")
    level, bars, git = logger.level, datasets.is_progress_bar_enabled(), lm_eval.evaluator.get_git_commit_hash
    logger.setLevel(logging.WARNING if progress else logging.ERROR)
    datasets.disable_progress_bar()
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    bars_shown = progress and sys.stderr.isatty()
    try:
        with contextlib.redirect_stderr(sys.stderr if bars_shown else io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
        lm_eval.evaluator.get_git_commit_hash = git
        if bars:
            datasets.enable_progress_bar()


def harness_model(model, tokenizer, *, batch_size: int = 16):
    """lm-eval's ``HFLM`` around ``model``: a transformers model, a PEFT model, or a ``RoutedModel``
    (whose router picks the experts for each batch lm-eval runs)."""
    from lm_eval.models.huggingface import HFLM

    class MoergeLM(HFLM):
        """HFLM whose forward and generate go through the router first, when there is one."""

        def __init__(self, routed, **kw):
            self.routed = routed
            super().__init__(**kw)

        def _model_call(self, inps, attn_mask=None, labels=None):
            if self.routed is None:
                return super()._model_call(inps, attn_mask, labels)
            with self.routed.routing(inps, None):  # right-padded rows: the router reads the whole text
                return super()._model_call(inps, attn_mask, labels)

        def _model_generate(self, context, max_length, stop, **kw):
            if self.routed is None:
                return super()._model_generate(context, max_length, stop, **kw)
            with self.routed.routing(context, kw.get("attention_mask")):
                return super()._model_generate(context, max_length, stop, **kw)

    routed = model if hasattr(model, "routing") else None
    inner = routed.model if routed is not None else model
    device = str(next(inner.parameters()).device)
    tok = bos_tokenizer(tokenizer)
    with _quiet():
        return MoergeLM(routed, pretrained=inner, tokenizer=tok, device=device, batch_size=batch_size,
                        add_bos_token=tok is not tokenizer or None)


@dataclass
class HarnessResult:
    """lm-eval's results per task (``metric,filter`` -> value), each task's first metric and its value
    (``primary``), whether higher is better, and the per-example records when asked for."""

    results: dict
    primary: dict[str, float]
    metric: dict[str, str]
    higher_is_better: dict[str, bool]
    n: dict[str, int]
    samples: dict | None = None

    def to_dict(self) -> dict:
        return {"results": self.results, "primary": self.primary, "metric": self.metric,
                "higher_is_better": self.higher_is_better, "n": self.n}


def _primary(task_results: dict) -> tuple[str, float] | None:
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key, float(value)
    return None


def run(model, tokenizer, tasks, *, limit: int | float | None = None, num_fewshot: int | None = None,
        batch_size: int = 16, log_samples: bool = False, seed: int = 0, progress: bool = False) -> HarnessResult:
    """Score ``model`` on lm-eval ``tasks`` (a ``Tasks`` or anything ``resolve`` takes). ``limit``: at
    most this many examples per task (lm-eval's ``--limit``)."""
    tasks = tasks if isinstance(tasks, Tasks) else resolve(tasks)
    import lm_eval

    lm = harness_model(model, tokenizer, batch_size=batch_size)
    with _quiet(progress), contextlib.redirect_stdout(io.StringIO()):  # lm-eval prints stray lines
        manager = tasks.manager()
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks.names, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=log_samples,
                                          apply_chat_template=uses_chat(tokenizer), random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except (MoergeError, KeyboardInterrupt):
            raise
        except Exception as e:  # the tasks were built and rendered by resolve: what is left is the run itself
            raise MoergeError(f"lm-eval could not run {', '.join(tasks.names)}: {_why(e)}; check the task YAML "
                              "(its filters, generation_kwargs and metric_list)") from None
    if res is None:
        raise MoergeError("lm-eval returned no results")
    results = {k: {m: v for m, v in r.items()} for k, r in res["results"].items()}
    primary, metric, hib = {}, {}, {}
    for task, r in results.items():
        p = _primary(r)
        if p is not None:
            metric[task], primary[task] = p
            name = p[0].split(",")[0]
            hib[task] = bool(res.get("higher_is_better", {}).get(task, {}).get(name, True))
    n = {t: int(v.get("effective", v.get("original", 0))) if isinstance(v, dict) else int(v)
         for t, v in (res.get("n-samples") or {}).items()}
    return HarnessResult(results, primary, metric, hib, n, res.get("samples") if log_samples else None)


def scores(model, tokenizer, items: list[str], *, n: int) -> dict[str, float]:
    """``lm-eval:TASK`` items -> the first metric of each (on at most ``n`` examples), keyed as written:
    how lm-eval tasks sit beside the built-in skills in ``evaluate`` and the merge report. A metric
    where lower is better (perplexity) is refused there: those tables rank by higher scores."""
    tasks = resolve(items)
    by_item: dict[str, list[str]] = {}
    for name in tasks.names:
        by_item.setdefault(tasks.given[name], []).append(name)
    for raw, names in by_item.items():
        if len(names) > 1:
            raise MoergeError(f"{raw}: defines {len(names)} lm-eval tasks ({', '.join(names)}); a score table takes one "
                              f"task per item: give each YAML file as its own lm-eval:FILE item")
    res = run(model, tokenizer, tasks, limit=n)
    out = {}
    for raw, (name,) in by_item.items():
        if name not in res.primary:
            raise MoergeError(f"lm-eval task {name} reported no metric; score it with `moerge eval --lm-eval {name}`")
        if not res.higher_is_better.get(name, True):
            raise MoergeError(f"lm-eval task {name}: its metric {res.metric[name]} is better when lower; score it with "
                              f"`moerge eval --lm-eval {name}` instead")
        out[raw] = res.primary[name]
    return out
