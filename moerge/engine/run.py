"""A recipe from its forms (``load_recipe``), planned (``plan``) and run (``run``): the merge engine's
entry points, for every kind of recipe (one stage, several YAML documents, a mergekit-moe config).

These sit in the engine (not in the Python API) because the parts above it (the merge report, fusion,
search) plan and run recipes too; ``moerge.api.merge`` adds the merge report on top. Each function
imports the engine when called (start-up time: the API, and so ``moerge --help``, load no torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from moerge.errors import MoergeError

if TYPE_CHECKING:
    from moerge.engine.executor import MergeResult
    from moerge.engine.multi import MultiPlan, MultiRecipe
    from moerge.engine.plan import Plan
    from moerge.engine.recipe import Recipe


def load_recipe(recipe: "str | os.PathLike | dict | list | Recipe | MultiRecipe") -> "Recipe | MultiRecipe":
    """A Recipe from a YAML path, YAML text, a dict, or a Recipe; a MultiRecipe from a file or text of
    several YAML documents (mergekit-multi's form) or a list of dicts or Recipes (one per stage)."""
    import yaml

    from moerge.engine import multi
    from moerge.engine.recipe import Recipe, parse_recipe, recipe_yaml
    from moerge.moe.config import MoEConfig, is_moe, parse_moe

    if isinstance(recipe, (Recipe, multi.MultiRecipe, MoEConfig)):
        return recipe
    if isinstance(recipe, dict) and is_moe(recipe):  # a mergekit-moe config (experts:, no merge_method)
        return parse_moe(recipe_yaml(recipe), "<recipe>")
    if isinstance(recipe, (list, tuple)):
        return multi.from_list(list(recipe))
    if isinstance(recipe, dict):
        return parse_recipe(recipe_yaml(recipe), "<recipe>")
    text = str(recipe)
    if "\n" in text or "merge_method" in text:
        source = "<recipe>"
    else:
        from moerge.engine.recipe import read_recipe_text

        source, text = text, read_recipe_text(Path(text))
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        data = None  # several documents, or broken YAML: multi.parse reports it
        try:
            docs = list(yaml.safe_load_all(text))
        except (yaml.YAMLError, RecursionError):
            docs = []
        if len(docs) > 1 and any(is_moe(d) for d in docs):
            k = next(i for i, d in enumerate(docs) if is_moe(d)) + 1
            raise MoergeError(f"{source}: YAML document {k} is an MoE config (base_model + experts), which cannot be a "
                              "stage of a multi-document recipe yet; put it in a file of its own and merge that")
    if is_moe(data):
        return parse_moe(text, source)
    return multi.parse(text, source)


def plan(recipe, *, seed: int | None = None, library: "str | os.PathLike | None" = None,
         allow_same_experts: bool = False, keep_intermediates: "str | os.PathLike | None" = None) -> "Plan | MultiPlan":
    """Validate a recipe against its inputs (headers only) and return the per-tensor plan.
    ``library`` is where ``library://NAME@V`` models are found (default: $MOERGE_LIBRARY, else ".").
    A multi-document recipe gives a MultiPlan: its stages in run order, each planned (later ones on
    the earlier ones' expected outputs); ``.stages[i].plan``, ``.summary()``."""
    from moerge.engine.multi import MultiRecipe, plan_stages
    from moerge.engine.plan import build_plan
    from moerge.moe.config import MoEConfig

    r = load_recipe(recipe)
    if isinstance(r, MultiRecipe):
        return plan_stages(r, seed=seed, library=library, keep=None if keep_intermediates is None else True)
    if keep_intermediates is not None:
        raise MoergeError("--keep-intermediates: the recipe has one stage (one YAML document), so there are no "
                          "intermediate outputs to keep; drop the option")
    if isinstance(r, MoEConfig):  # a mergekit-moe config: moerge/moe/build.py
        from moerge.moe.build import build_moe_plan

        return build_moe_plan(r if seed is None else _reseed(r, seed), library, allow_same=allow_same_experts)
    if seed is not None:
        r = r.model_copy(update={"seed": seed})
    return build_plan(r, library)


def run(recipe, out_dir, *, overwrite: bool = False, seed: int | None = None, workers: int | None = None,
        shard_size="5B", progress: bool = False, library=None, keep_intermediates=None,
        allow_same_experts: bool = False, lazy: bool = False, device: str | None = None) -> "MergeResult":
    """Plan and run a recipe (``moerge.api.merge``). ``device``: where each tensor is computed (None:
    the one named by ``--device``/``$MOERGE_DEVICE``, else the CPU)."""
    from moerge.engine.executor import execute
    from moerge.lm.device import named

    where = named(device)
    from moerge.engine.multi import MultiRecipe, run_stages
    from moerge.moe.config import MoEConfig

    r = load_recipe(recipe)
    if isinstance(r, MultiRecipe):
        return run_stages(r, out_dir, keep_intermediates=keep_intermediates, overwrite=overwrite, seed=seed,
                          workers=workers, shard_size=shard_size, progress=progress, library=library, lazy=lazy,
                          device=where)
    if lazy:
        raise MoergeError("--lazy: the recipe has one stage (one YAML document), so there are no intermediate outputs to "
                          "reuse; drop --lazy")
    p = plan(r, seed=seed, library=library, allow_same_experts=allow_same_experts, keep_intermediates=keep_intermediates)
    if isinstance(r, MoEConfig):  # a mergekit-moe config: an MoE checkpoint from dense models
        from moerge.moe.build import execute_moe

        return execute_moe(p, out_dir, overwrite=overwrite, shard_size=shard_size, progress=progress)
    return execute(p, out_dir, overwrite=overwrite, workers=workers, shard_size=shard_size, progress=progress, device=where)


def _reseed(r, seed: int):
    """An MoE config with another seed, keeping where it was read from (for error lines)."""
    c = r.model_copy(update={"seed": seed})
    c._source, c._text = r._source, r._text
    return c
