"""What a merged folder carries besides weights: config, tokenizer, and a model card with lineage.

The card's YAML front matter uses the hub's fields (base_model, tags, library_name) so a published
merge is indexed as one; its body holds the exact recipe and a fingerprint of every input, so anyone
can tell what the model was made from and re-run it. The last stage of a multi-document recipe records
every stage it depends on (``StageRecord``, ``chain_card_text``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from moerge.engine.chat_templates import resolve
from moerge.io.fingerprint import fingerprint
from moerge.version import __version__

if TYPE_CHECKING:
    from moerge.engine.plan import Plan
    from moerge.engine.recipe import Recipe
    from moerge.io.writer import ShardedWriter

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
)


def lineage(plan: "Plan") -> list[dict]:
    """Every input as merged: its pinned reference (``library://sort@2``, ``org/name@<commit>``) and fingerprint."""
    return [{"model": m.pinned, "fingerprint": fingerprint(m.source)} for m in plan.models]


def card_text(plan: "Plan", inputs: list[dict]) -> str:
    r = plan.pinned_recipe
    front = {
        "base_model": [m["model"] for m in inputs],
        "library_name": "transformers",
        "tags": ["merge", "moerge", r.merge_method],
    }
    rows = "\n".join(f"| `{m['model']}` | `{m['fingerprint']}` |" for m in inputs)
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# {r.name or 'Merged model'}\n\n"
        f"Merged with [moerge](https://pypi.org/project/moerge/) {__version__} using **{plan.method.pretty or plan.method.name}**"
        + (f" ({plan.method.reference})" if plan.method.reference else "") + ".\n\n"
        "## Inputs\n\n| model | fingerprint |\n|---|---|\n" + rows + "\n\n"
        "## Recipe\n\nRe-run with `moerge merge moerge_recipe.yaml OUT_DIR`.\n\n```yaml\n" + r.to_yaml() + "```\n"
    )


@dataclass
class StageRecord:
    """An earlier stage of a multi-document recipe, as merged (engine/multi.py): a plan that is a later
    stage carries them, in run order, as ``plan.chain``, and its card and ``moerge_recipe.yaml`` then
    record every stage, so re-running the saved recipe rebuilds the whole chain."""

    name: str
    recipe: "Recipe"  # pinned (plan.pinned_recipe); other stages are referred to by name
    method: str  # as the card names it
    inputs: list[dict]  # lineage(plan): a stage's output is listed under its stage name


def _is_stage(ref: str, names: set[str]) -> bool:
    return ref.partition("+")[0] in names


def stage_yaml(recipe: "Recipe") -> str:
    """One stage's YAML document, its ``name:`` first (as mergekit-multi's examples write it)."""
    if recipe.name is None:
        return recipe.to_yaml()
    return yaml.safe_dump({"name": recipe.name}) + recipe.model_copy(update={"name": None}).to_yaml()


def chain_recipe(plan: "Plan", chain: list[StageRecord]) -> str:
    """Every stage's pinned recipe, one YAML document each, in run order (this stage last)."""
    return "---\n".join([stage_yaml(s.recipe) for s in chain] + [stage_yaml(plan.pinned_recipe)])


def chain_card_text(plan: "Plan", inputs: list[dict], chain: list[StageRecord]) -> str:
    """The card of a multi-stage merge: every stage, the models outside the chain with fingerprints,
    the fingerprints of the intermediate outputs as they were read, and the whole recipe."""
    r = plan.pinned_recipe
    names = {s.name for s in chain}
    stages = chain + [StageRecord(r.name or "(final)", r, plan.method.pretty or plan.method.name, inputs)]
    external: dict[str, str] = {}
    produced: dict[str, str] = {}
    for s in stages:
        for m in s.inputs:
            (produced if _is_stage(m["model"], names) else external).setdefault(m["model"], m["fingerprint"])
    front = {
        "base_model": list(external),
        "library_name": "transformers",
        "tags": ["merge", "moerge", *dict.fromkeys(s.recipe.merge_method for s in stages)],
    }
    steps = "\n".join(f"| {i} | `{s.name}` | {s.method} | " + ", ".join(f"`{m['model']}`" for m in s.inputs) + " |"
                      for i, s in enumerate(stages, 1))
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in external.items())
    mids = "\n".join(f"| `{k}` | `{v}` |" for k, v in produced.items())
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# {r.name or 'Merged model'}\n\n"
        f"Merged with [moerge](https://pypi.org/project/moerge/) {__version__} in {len(stages)} stages (a multi-document "
        "recipe, run as mergekit-multi runs it: each stage's output is an input of a later one); the last uses "
        f"**{plan.method.pretty or plan.method.name}**" + (f" ({plan.method.reference})" if plan.method.reference else "") + ".\n\n"
        "## Stages\n\n| # | stage | method | inputs |\n|---|---|---|---|\n" + steps + "\n\n"
        "## Inputs\n\n| model | fingerprint |\n|---|---|\n" + rows + "\n\n"
        "## Intermediate outputs\n\n| stage | fingerprint |\n|---|---|\n" + mids + "\n\n"
        "## Recipe\n\nRe-run every stage with `moerge merge moerge_recipe.yaml OUT_DIR` (`--keep-intermediates DIR` "
        "keeps the intermediate outputs).\n\n```yaml\n" + chain_recipe(plan, chain) + "```\n"
    )


def write_extras(plan: "Plan", writer: "ShardedWriter") -> None:
    if plan.config is not None:
        writer.add_file("config.json", json.dumps(plan.config, indent=2) + "\n")
    src = plan.config_from.folder
    if src.is_dir() and (src / "generation_config.json").is_file():
        writer.copy_file(src / "generation_config.json")
    tok = plan.tokenizer_from.folder if plan.tokenizer_from else None
    built = plan.alignment.tokenizer if plan.alignment is not None else None
    if built is not None:  # a vocabulary moerge built (union, added tokens): saved as transformers saves it
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            built.save_pretrained(d)
            for f in sorted(Path(d).iterdir()):
                if f.is_file():
                    writer.copy_file(f)
    elif tok is not None and tok.is_dir():
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                writer.copy_file(tok / name)
    if plan.recipe.chat_template:

        template = resolve(plan.recipe.chat_template, [m.folder for m in plan.models])
        if template:  # auto with no input carrying a template: the tokenizer keeps its own
            _set_chat_template(writer, template)
    inputs = lineage(plan)
    chain = getattr(plan, "chain", None)  # a later stage of a multi-document recipe: record the whole chain
    writer.add_file("moerge_recipe.yaml", saved_recipe(plan))  # re-running it reproduces this merge
    writer.add_file("README.md", chain_card_text(plan, inputs, chain) if chain else card_text(plan, inputs))


def saved_recipe(plan: "Plan") -> str:
    """The ``moerge_recipe.yaml`` a merge writes: its pinned recipe, or for a later stage of a
    multi-document recipe every stage it depends on (``--lazy`` compares it to reuse a kept output)."""
    chain = getattr(plan, "chain", None)
    return chain_recipe(plan, chain) if chain else plan.pinned_recipe.to_yaml()


def _set_chat_template(writer: "ShardedWriter", template: str) -> None:
    path: Path = writer.tmp / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg["chat_template"] = template
    writer.add_file("tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
    if (writer.tmp / "chat_template.jinja").exists():  # newer transformers prefer the file
        writer.add_file("chat_template.jinja", template)
