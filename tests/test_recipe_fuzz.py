"""Fuzzing the recipe front door: whatever a recipe holds, ``moerge.plan`` plans it or raises a
MoergeError of one line. Any other exception (IndexError, TypeError, RecursionError ...) is a bug.

Three generators: recipes built at random from mergekit's vocabulary (well-shaped ones per method
that reach the planner, and wild ones: wrong types, missing keys, empty lists, unknown methods, bad
values, gradients, filter lists, slices with bad layer ranges, nulls, nested garbage); mutations of
valid recipes over the tiny local models (a key deleted, a value replaced by garbage, retyped or
changed to another plausible one, a list emptied or grown); and raw text. Recipes go in as a dict
or as YAML text. ``MOERGE_FUZZ_EXAMPLES=3000`` hunts longer.
"""

from __future__ import annotations

import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moerge
from moerge.errors import MoergeError
from moerge.methods import registry

EXAMPLES = int(os.environ.get("MOERGE_FUZZ_EXAMPLES", "300"))  # about 20 s in all on 2 cores


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


METHODS = registry.names()
PARAMS = sorted({p.name for m in METHODS for p in registry.get(m).params})
TOP_KEYS = ["merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template", "seed", "name", "modules"]
OTHER_KEYS = ["model", "parameters", "sources", "layer_range", "base_model", "residual_weight", "filter", "value",
              "lora", "path", "revision"]


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """The tiny models, a library holding one LoRA expert, and a scratch working folder; the hub is offline."""
    import huggingface_hub.constants as hub_constants
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moerge.library import Library

    root = tmp_path_factory.mktemp("fuzz")
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(root / "adapter")
    lib = Library.init(root / "lib", tiny["base"])
    lib.add(root / "adapter", "sort")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # relative references (./nope, tests, .) resolve in a scratch folder
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MOERGE_CACHE", str(root / "cache"))  # Fisher and RegMean statistics of fuzzed recipes
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        yield {**{k: str(v) for k, v in tiny.items()}, "adapter": str(root / "adapter"), "lib": lib.root}


def refs(w) -> list[str]:
    base, ft1, ft2 = w["base"], w["ft1"], w["ft2"]
    return [base, ft1, ft2, w["ft3"], f"{base}+{w['adapter']}", w["adapter"], f"{w['adapter']}/adapter_model.safetensors",
            f"{ft1}+{w['adapter']}", f"{base}+{ft1}", f"{base}/model.safetensors", f"{base}/config.json", w["root"],
            "library://sort", "library://sort@1", "library://sort@7", "library://", "library://bad name", "library://sort@x",
            "./nope", "/nonexistent/model", "org/name", "org/name@main", "~nosuchuser/x", "a+", "+b", "+", "@", "x" * 300,
            f"{base}@v1", f"{base}+", "tests", "."]


def mostly(good, bad):
    """``good`` three times in four: enough garbage to probe the schema, enough sense to reach the planner."""
    return st.one_of(good, good, good, bad)


def scalars(w):
    return st.one_of(
        st.none(), st.booleans(), st.integers(-3, 5), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
        st.floats(-0.5, 1.5), st.text(max_size=8), st.sampled_from(refs(w) + METHODS + PARAMS + TOP_KEYS +
                                                                       ["base", "union", "chatml", "bf16", "int4", "{{ x }}", "mlp", "*"]),
    )


def garbage(w):
    keys = st.one_of(st.sampled_from(TOP_KEYS + OTHER_KEYS + PARAMS), st.text(max_size=4), st.integers(-1, 2), st.none(), st.booleans())
    return st.recursive(scalars(w), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                        max_leaves=12)


def settings_(w):
    number = mostly(st.one_of(st.floats(0.01, 1), st.integers(1, 3)),
                    st.sampled_from([0, -1, 1.5, 1e-9, 1e300, float("nan"), float("inf"), "0.3", "x", True]))
    value = st.one_of(number, st.lists(number, max_size=4))
    cond = st.fixed_dictionaries({"value": value}, optional={"filter": st.sampled_from(["mlp", "self_attn", "*", "embed", None, 3, ""])})
    return mostly(st.one_of(number, st.booleans(), st.lists(number, max_size=5), st.lists(cond, max_size=3), cond), garbage(w))


def parameters(w):
    return mostly(st.dictionaries(st.sampled_from(PARAMS + ["dens1ty", ""]), settings_(w), max_size=4), garbage(w))


def in_range(param):
    """Values a method's parameter accepts (now and then one it refuses): a scalar, a gradient, or conditions."""
    if param.type is bool:
        one = st.booleans()
    else:
        lo = 0.0 if param.low is None else param.low
        hi = 2.0 if param.high is None else param.high
        one = st.floats(lo, hi, exclude_min=param.open_low, exclude_max=param.open_high)
        if param.type is int:
            one = st.integers(int(lo), int(hi) + 3)
    one = mostly(one, st.sampled_from([-1, 0, 1, 1.5, "0.5", "x", None]))
    cond = st.fixed_dictionaries({"value": st.one_of(one, st.lists(one, min_size=1, max_size=3))},
                                 optional={"filter": st.sampled_from(["mlp", "self_attn", "embed", "*", "norm"])})
    return st.one_of(one, one, st.lists(one, min_size=1, max_size=4), st.lists(cond, min_size=1, max_size=3))


@st.composite
def sane_recipe(draw, w):
    """A recipe of the right shape for one method over the tiny models: it reaches the planner."""
    method = registry.get(draw(st.sampled_from(METHODS)))
    good = [w["base"], w["ft1"], w["ft2"], w["ft3"], f"{w['base']}+{w['adapter']}", "library://sort"]
    ref = mostly(st.sampled_from(good), st.sampled_from(refs(w)))

    def params(per_input: bool):
        names = [p for p in method.params if p.per_input == per_input or draw(st.integers(0, 9)) == 0]
        chosen = draw(st.lists(st.sampled_from(names), unique_by=lambda p: p.name, max_size=len(names))) if names else []
        return {p.name: draw(in_range(p)) for p in chosen}

    def entry(**more):
        e = {"model": draw(ref), **more}
        own = params(True)
        return {**e, "parameters": own} if own else e

    r = {"merge_method": method.name}
    if draw(st.booleans()):
        r["models"] = [entry() for _ in range(draw(st.integers(1, 4)))]
    else:
        def layer_range():
            start = draw(st.integers(0, 3))
            return [start, start + draw(st.integers(1, 3))]
        r["slices"] = [{"sources": [entry(layer_range=layer_range()) for _ in range(draw(st.integers(1, 3)))]}
                       for _ in range(draw(st.integers(1, 3)))]
    if method.base != "ignored" or draw(st.booleans()):
        r["base_model"] = draw(mostly(st.just(w["base"]), ref))
    shared = params(False)
    if shared:
        r["parameters"] = shared
    for key, value in (("dtype", st.sampled_from(["bfloat16", "fp16", "float32", "float64"])), ("seed", st.integers(-2, 2**70)),
                       ("tokenizer_source", st.one_of(st.just("base"), ref)), ("out_dtype", st.sampled_from(["float16", "bf16"]))):
        if draw(st.integers(0, 3)) == 0:
            r[key] = draw(value)
    return r


def random_recipe(w):
    ref = mostly(st.sampled_from(refs(w)), st.one_of(st.fixed_dictionaries(
        {"model": st.one_of(st.sampled_from(refs(w)), st.fixed_dictionaries({"path": st.sampled_from(refs(w))},
                                                                             optional={"revision": scalars(w)}))},
        optional={"lora": st.one_of(st.sampled_from(refs(w)), scalars(w))}), scalars(w)))
    model = mostly(st.fixed_dictionaries({"model": ref}, optional={"parameters": parameters(w)}), garbage(w))
    layer_range = mostly(st.tuples(st.integers(-1, 4), st.integers(0, 5)).map(list),
                         st.one_of(st.lists(st.integers(-2, 6), max_size=3), garbage(w)))
    source = mostly(st.fixed_dictionaries({"model": ref, "layer_range": layer_range}, optional={"parameters": parameters(w)}), garbage(w))
    slice_ = mostly(st.fixed_dictionaries({"sources": st.lists(source, max_size=3)},
                                          optional={"base_model": ref, "parameters": parameters(w)}), garbage(w))
    sane = sane_recipe(w)
    wild = st.fixed_dictionaries(
        {"merge_method": st.one_of(st.sampled_from(METHODS + ["frankenmerge", "TIES", ""]), scalars(w))},
        optional={"models": st.one_of(st.lists(model, max_size=4), garbage(w)),
                  "slices": st.one_of(st.lists(slice_, max_size=3), garbage(w)),
                  "base_model": ref, "parameters": parameters(w), "dtype": scalars(w), "out_dtype": scalars(w),
                  "tokenizer_source": st.one_of(st.sampled_from(["base", "union"]), ref), "chat_template": scalars(w),
                  "seed": scalars(w), "name": scalars(w), "tokenizer": garbage(w), "modules": garbage(w),
                  "junk": garbage(w)})
    return mostly(sane, wild)


def valid_recipes(w) -> list[dict]:
    base, f1, f2, f3 = w["base"], w["ft1"], w["ft2"], w["ft3"]
    return [
        {"merge_method": "ties", "base_model": base, "dtype": "bfloat16", "parameters": {"normalize": True},
         "models": [{"model": f1, "parameters": {"weight": [0.2, 0.8], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
                    {"model": f2, "parameters": {"weight": 0.5, "density": 0.5}}]},
        {"merge_method": "della", "base_model": base, "seed": 3,
         "models": [{"model": f1, "parameters": {"weight": 1, "density": 0.6, "epsilon": 0.1}}, {"model": "library://sort", "parameters": {"weight": 0.5}}]},
        {"merge_method": "linear", "models": [{"model": f1, "parameters": {"weight": 1.0}}, {"model": f"{base}+{w['adapter']}", "parameters": {"weight": 2}}]},
        {"merge_method": "slerp", "base_model": base, "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
         "slices": [{"sources": [{"model": base, "layer_range": [0, 3]}, {"model": f1, "layer_range": [0, 3]}]}]},
        {"merge_method": "passthrough", "out_dtype": "float16",
         "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}]}, {"sources": [{"model": f3, "layer_range": [1, 3]}]}]},
        {"merge_method": "model_stock", "base_model": base, "tokenizer_source": f2,
         "models": [{"model": f1}, {"model": f2}, {"model": f3}]},
        {"merge_method": "karcher", "parameters": {"max_iter": 5, "tol": 1e-6}, "models": [{"model": f1}, {"model": f2}]},
    ]


def paths(node, here=()):
    """Every location in a nested recipe, as a key path."""
    yield here
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, here + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, here + (i,))


def get(node, path):
    for p in path:
        node = node[p]
    return node


def retype(v):
    """Plausible wrong types for a value."""
    out = [None, [], {}, [v], {"value": v}, str(v), 0, -1, 1.5, True]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        out += [-v, v * 1000, float("nan"), float("inf"), [v, "x"]]
    if isinstance(v, str):
        out += [v + "x", v.upper(), "", " ", v + "\n", f"{v}+{v}", f"{v}@main"]
    if isinstance(v, list):
        out += [v[:1], v[::-1], v + v, v * 3]
    return out


def tweak(w, v):
    """A value of the same kind, plausible enough to pass the schema and reach the planner."""
    if isinstance(v, bool):
        return st.booleans()
    if isinstance(v, (int, float)):
        return st.one_of(st.integers(-1, 5), st.floats(-0.2, 1.2), st.sampled_from([0, 1, 1e-9, 0.49, 0.5]))
    if isinstance(v, str):
        return st.sampled_from(refs(w) + METHODS + ["bfloat16", "float16", "base", "mlp", "*"])
    if isinstance(v, list) and v:
        return st.one_of(st.just(v[:-1]), st.just(v + v[-1:]), st.just(v[::-1]), st.lists(st.sampled_from(v), max_size=4))
    if isinstance(v, dict) and v:
        return st.sampled_from([{k: x for k, x in v.items() if k != drop} for drop in v])
    return st.just(v)


@st.composite
def mutated(draw, w):
    import copy

    r = copy.deepcopy(draw(st.sampled_from(valid_recipes(w))))
    for _ in range(draw(st.integers(1, 3))):
        places = list(paths(r))[1:][::-1]  # reversed: hypothesis favours early choices, and those were the top keys
        if not places:  # everything deleted
            break
        leaves = [x for x in places if not isinstance(get(r, x), (dict, list))]
        if leaves and draw(st.booleans()):  # half the time, a value changed to another plausible one
            where, op = draw(st.sampled_from(leaves)), "tweak"
        else:
            where = draw(st.sampled_from(places))
            op = draw(st.sampled_from(["delete", "garbage", "retype", "tweak"]))
        parent, key = get(r, where[:-1]), where[-1]
        old = parent[key]
        if key == "merge_method" and op == "tweak":
            parent[key] = draw(st.sampled_from(METHODS))
            continue
        if op == "delete":
            del parent[key]
        elif op == "garbage":
            parent[key] = draw(garbage(w))
        elif op == "retype":
            parent[key] = draw(st.sampled_from(retype(old)))
        else:
            parent[key] = draw(tweak(w, old))
    return r


def string_keys(node) -> bool:
    if isinstance(node, dict):
        return all(isinstance(k, str) for k in node) and all(string_keys(v) for v in node.values())
    if isinstance(node, list):
        return all(string_keys(v) for v in node)
    return True


def check(recipe, w, as_text: bool) -> None:
    if as_text or not string_keys(recipe):  # the API's dict form sorts keys, so it takes string keys
        recipe = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
        if "\n" not in recipe and "merge_method" not in recipe:
            recipe += "\n"  # YAML text, not a path
    try:
        moerge.plan(recipe, library=w["lib"])
    except MoergeError as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
        assert "Traceback" not in msg


@fuzz(EXAMPLES)
@given(data=st.data())
def test_random_recipes_only_raise_moerge_errors(world, data):
    check(data.draw(random_recipe(world)), world, data.draw(st.booleans()))


@fuzz(2 * EXAMPLES)
@given(data=st.data())
def test_mutated_valid_recipes_only_raise_moerge_errors(world, data):
    check(data.draw(mutated(world)), world, data.draw(st.booleans()))


@fuzz(EXAMPLES)
@given(text=st.one_of(st.text(max_size=60), st.text(alphabet=":-[]{}&*!|>'\"%@`#,?~\n 01ab.", max_size=60).map(lambda s: "merge_method: ties\n" + s)))
def test_random_text_only_raises_moerge_errors(world, text):
    try:
        moerge.plan(text, library=world["lib"])
    except MoergeError as e:
        assert str(e).strip() and "\n" not in str(e), repr(str(e))


def test_the_valid_recipes_plan(world):
    """The mutations start from recipes that are valid, so they probe past the schema into the planner."""
    for r in valid_recipes(world):
        assert moerge.plan(r, library=world["lib"]).tasks
