"""moerge: merge, route and version specialist experts built from one base model.

The Python API is what the CLI wraps::

    import moerge
    moerge.merge("recipe.yaml", "out/")             # a mergekit-style recipe, path or text or Recipe
    plan = moerge.plan("recipe.yaml"); print(plan.summary())
"""

from __future__ import annotations

__version__ = "0.1.0"

import os
from pathlib import Path
from typing import TYPE_CHECKING

from moerge.errors import MoergeError

if TYPE_CHECKING:
    from moerge.engine.executor import MergeResult
    from moerge.engine.plan import Plan
    from moerge.engine.recipe import Recipe


def load_recipe(recipe: "str | os.PathLike | dict | Recipe") -> "Recipe":
    """A Recipe from a YAML path, YAML text, a dict, or a Recipe."""
    import yaml

    from moerge.engine.recipe import Recipe, load_recipe as _load, parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        try:
            text = yaml.safe_dump(recipe)
        except yaml.YAMLError as e:  # a value YAML cannot represent (an object, a tensor)
            raise MoergeError(f"<recipe>: holds a value a recipe cannot have ({str(e).splitlines()[0][:120]}); "
                              "use strings, numbers, lists and dicts") from None
        return parse_recipe(text, "<recipe>")
    text = str(recipe)
    if "\n" in text or "merge_method" in text:
        return parse_recipe(text, "<recipe>")
    return _load(Path(text))


def plan(recipe, *, seed: int | None = None, library: "str | os.PathLike | None" = None) -> "Plan":
    """Validate a recipe against its inputs (headers only) and return the per-tensor plan.
    ``library`` is where ``library://NAME@V`` models are found (default: $MOERGE_LIBRARY, else ".")."""
    from moerge.engine.plan import build_plan

    r = load_recipe(recipe)
    if seed is not None:
        r = r.model_copy(update={"seed": seed})
    return build_plan(r, library)


def merge(recipe, out_dir: "str | os.PathLike", *, overwrite: bool = False, seed: int | None = None,
          workers: int | None = None, shard_size: "str | int" = "5B", progress: bool = False,
          library: "str | os.PathLike | None" = None) -> "MergeResult":
    """Merge the models a recipe names into ``out_dir`` (created atomically)."""
    from moerge.engine.executor import execute

    return execute(plan(recipe, seed=seed, library=library), out_dir, overwrite=overwrite, workers=workers,
                   shard_size=shard_size, progress=progress)


__all__ = ["MoergeError", "load_recipe", "merge", "plan", "__version__"]
