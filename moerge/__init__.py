"""moerge: merge, route and version specialist experts built from one base model.

The Python API lives in ``moerge.api`` and is re-exported here::

    import moerge
    moerge.merge("recipe.yaml", "out/")             # a mergekit-style recipe, path or text or Recipe
    plan = moerge.plan("recipe.yaml"); print(plan.summary())

The names load on first use (PEP 562), so ``import moerge`` stays light (no torch) and ``moerge --help``
fast; the Python API is the same either way.
"""

from __future__ import annotations

from moerge.errors import MoergeError
from moerge.version import __version__

API = ("Scores", "evaluate", "evaluate_router", "load_recipe", "merge", "merge_lora", "plan", "train_expert")  # moerge.api.__all__
__all__ = ["MoergeError", *API, "__version__"]


def __getattr__(name: str):
    if name in API:
        from moerge import api  # start-up time: the API's modules load when first used

        return getattr(api, name)
    raise AttributeError(f"module 'moerge' has no attribute {name!r}")
