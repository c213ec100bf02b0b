import pytest

from moerge.engine.recipe import parse_recipe, split_ref
from moerge.errors import MoergeError

GOOD = """\
merge_method: dare_ties
base_model: org/base@main
models:
  - model: ./a+./lora
    parameters:
      weight: [0.1, 0.9]
      density:
        - filter: mlp
          value: 0.3
        - value: 0.7
  - model: {model: {path: ./b}}
    parameters: {weight: 0.5, density: 1}
parameters: {normalize: true, int8_mask: true, lambda: 1.1}
dtype: bf16
seed: 7
"""


def test_mergekit_recipe_parses_and_round_trips():
    r = parse_recipe(GOOD)
    assert r.dtype == "bfloat16" and r.seed == 7
    assert r.models[1].model == "./b"
    assert split_ref(r.models[0].model) == ("./a", None, "./lora")
    assert split_ref(r.base_model) == ("org/base", "main", None)
    again = parse_recipe(r.to_yaml())
    assert again == r


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nmodels:\n  - model: a\n    parameters:\n      density: 1.5\n",
     r"line 5: models\[0\]\.parameters\.density: must be in \(0, 1\], got 1.5"),
    ("merge_method: ties\nmodels:\n  - model: a\n    parameters:\n      density: [0.5, 0]\n",
     r"line 5: models\[0\]\.parameters\.density\[1\]: must be in \(0, 1\], got 0"),
    ("merge_method: frankenmerge\nmodels: [{model: a}]\n", r"line 1: merge_method: unknown merge method 'frankenmerge'; known: .*ties"),
    ("merge_method: ties\nmodels:\n  - model: a\n    weight: 1\n", r"line 4: models\[0\]\.weight: unknown key"),
    ("merge_method: ties\nmodels:\n  - model: a\n    parameters: {dens1ty: 1}\n", r"line 4: models\[0\]\.parameters\.dens1ty: unknown parameter; did you mean 'density'\? \(ties takes: weight, density"),
    ("merge_method: slerp\nmodels:\n  - model: a\n    parameters: {t: 0.5}\n  - model: a\n    parameters: {tt: 1}\n",
     r"line 6: models\[1\]\.parameters\.tt: unknown parameter; did you mean 't'\?"),
    ("merge_method: slerp\nmodels: [{model: a}]\nparameters: {t: 2}\n", r"line 3: parameters\.t: must be in \[0, 1\], got 2"),
    ("merge_method: ties\nmodels: [{model: a}]\nparameters: {normalize: maybe}\n", r"parameters\.normalize: must be true or false"),
    ("merge_method: ties\n", r"give exactly one of models: or slices:"),
    ("merge_method: ties\nmodels: [{model: a}]\nslices: []\n", r"give exactly one"),
    ("merge_method: ties\nmodules: {x: 1}\nmodels: [{model: a}]\n", r"modules:\) are not supported yet"),
    ("merge_method: ties\nmodels: [{model: a}]\ntokenizer: {source: base, pad_to_multiple_of: -1}\n", r"line 3: tokenizer: pad_to_multiple_of"),
    ("merge_method: ties\nmodels: [{model: a}]\ntokenizer: {source: base}\ntokenizer_source: base\n", r"not both"),
    ("merge_method: ties\nmodels: [{model: a}]\ndtype: int4\n", r"line 3: dtype: unknown dtype 'int4'"),
    ("models: [{model: a}]\n", r"merge_method: required key is missing"),
    ("merge_method: ties\nmodels:\n  - model: a\n   bad: [\n", r"not valid YAML"),
    ("- just\n- a list\n", r"a recipe is a YAML mapping"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [4, 2]\n", r"line 5: slices\[0\]\.sources\[0\]\.layer_range: must be"),
    ("merge_method: della\nmodels: [{model: a, parameters: {epsilon: 0.7}}]\n", r"epsilon: must be in \[0, 0.5\)"),
    ("merge_method: ties\nmodels: [{model: a}]\nchat_template: llama9\n", r"chat_template: unknown chat template 'llama9'; give a Jinja template, auto, or one of alpaca, chatml"),
    # found by fuzzing (tests/test_recipe_fuzz.py): each used to escape as a raw Python exception
    ("merge_method: passthrough\nslices: []\n", r"line 2: slices: is empty; give at least one slice"),
    ("merge_method: ties\nmodels: &a [*a]\n", r"models\[0\]"),
    ("merge_method: karcher\nmodels: [{model: a}]\nparameters: {max_iter: .inf}\n", r"line 3: parameters\.max_iter: must be a finite number"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: .nan}}]\n", r"models\[0\]\.parameters\.weight: must be a finite number"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: [1, -.inf]}}]\n", r"weight\[1\]: must be a finite number"),
    ("merge_method: linear\nmodels:\n  - model: \"a\\nb\"\n", r"line 3: models\[0\]\.model: 'a\\nb' holds control characters"),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {\"we\\nird\": 1}\n", r"parameters\.'we\\nird': unknown parameter"),
    # clear messages for malformed parameter settings (pydantic alone named an arbitrary union branch)
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: 3, value: 1}]}}]\n",
     r"weight: \[0\] filter must be a string"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: [1, {value: 2}]}}]\n", r"weight: mixes values and \{filter, value\}"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: []}}]\n", r"weight: is an empty list; give a value, a gradient"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {value: []}}}]\n", r"weight: value is an empty list"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {filter: mlp}}}]\n", r"weight: a condition needs a value"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {value: 1, when: x}}}]\n", r"weight: unknown key 'when' in a condition"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: [[1, 2]]}}]\n", r"weight: \[0\] must be a number, true/false or a string, not a list"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: ~}}]\n", r"weight: must be a number, true/false or a string, not null"),
    ("merge_method: linear\nseed: yes\nmodels: [{model: a}]\n", r"line 2: seed: must be a whole number, got True"),
    ("merge_method: ties\nmodels: [{model: {model: {path: a}, lora: 5}}]\n", r"models\[0\]\.model: lora must be a path or hub id"),
    ("merge_method: ties\nmodels: [{model: {model: {path: a, rev: x}}}]\n", r"models\[0\]\.model: unknown key 'rev' in model"),
    ("merge_method: ties\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}], base_model: [x]}]\n",
     r"slices\[0\]\.base_model: must be a path or hub id"),
])
def test_bad_recipes_give_one_line_with_key_and_line(text, message):
    with pytest.raises(MoergeError, match=message) as e:
        parse_recipe(text, "r.yaml")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("r.yaml")


def test_mergekit_long_form_references_keep_revisions():
    r = parse_recipe("merge_method: linear\nmodels:\n  - model: {model: {path: org/a, revision: v2}, lora: {path: org/l, revision: abc}}\n"
                     "  - model: {model: org/b, lora: ./l2}\n    parameters: {weight: 1}\n")
    assert [m.model for m in r.models] == ["org/a@v2+org/l@abc", "org/b+./l2"]
    assert split_ref(r.models[0].model) == ("org/a", "v2", "org/l@abc")


def test_with_refs_replaces_every_reference_and_nothing_else():
    r = parse_recipe("merge_method: slerp\nbase_model: library://x\ntokenizer_source: library://x\nparameters: {t: 0.5}\n"
                     "slices:\n  - base_model: library://x\n    sources:\n      - {model: library://x, layer_range: [0, 2]}\n"
                     "      - {model: b, layer_range: [0, 2]}\n")
    pinned = r.with_refs({"library://x": "library://x@3"})
    assert pinned.base_model == pinned.tokenizer_source == pinned.slices[0].base_model == "library://x@3"
    assert [s.model for s in pinned.slices[0].sources] == ["library://x@3", "b"]
    assert r.base_model == "library://x"  # the original is untouched
    assert pinned.to_yaml() == r.to_yaml().replace("library://x", "library://x@3")


def test_gradient_interpolation_stays_in_range():
    from moerge.engine.params import evaluate
    from moerge.methods import registry

    density, tol = registry.get("ties").param("density"), registry.get("karcher").param("tol")
    for i in range(101):  # rounding in (1 - f)·a + f·b must not step outside [a, b] and fail the range check
        assert evaluate([1.0, 1.0], "x", i / 100, density) == 1.0
        assert 0.1 <= evaluate([0.1, 0.1, 0.3], "x", i / 100, density) <= 0.3
        assert evaluate([5e-324, 5e-324], "x", i / 100, tol) == 5e-324  # 0.5 · 5e-324 rounds to 0, outside (0, inf)


# mergekit accepts these value formats (bench/mergekit_recipes.py measures what mergekit accepts and moerge refuses)
def test_mergekit_value_formats_are_accepted():
    r = parse_recipe("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]\n"
                     "parameters: {normalize: 1, int8_mask: 0, rescale: [{filter: mlp, value: 1}, {value: 0}]}\n"
                     "dtype: torch.bfloat16\nout_dtype: torch.float16\n")
    assert r.dtype == "bfloat16" and r.out_dtype == "float16"  # mergekit's dtype_from_name strips "torch."
    assert r.parameters["normalize"] is True and r.parameters["int8_mask"] is False  # mergekit tests settings for truth
    assert [c.value for c in r.parameters["rescale"]] == [True, False]
    assert r.models[0].parameters["weight"] == 1  # numbers stay numbers where the parameter is a number
    r = parse_recipe("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: ['0', ' 4']}]}]\n")
    assert list(r.slices[0].sources[0].layer_range) == [0, 4]  # mergekit's Tuple[int, int] reads "4" as 4
    with pytest.raises(MoergeError, match=r"line 3: parameters\.normalize: must be true or false"):
        parse_recipe("merge_method: ties\nmodels: [{model: a}]\nparameters: {normalize: 2}\n", "r.yaml")
    with pytest.raises(MoergeError, match=r"layer_range: must be \[start, end\]"):
        parse_recipe("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: ['0', 'x']}]}]\n", "r.yaml")
    with pytest.raises(MoergeError, match=r"unknown dtype 'int4'"):
        parse_recipe("merge_method: ties\nmodels: [{model: a}]\ndtype: torch.int4\n", "r.yaml")


def test_residual_weight_is_accepted_with_a_warning_and_no_effect(tiny):
    import warnings

    import moerge
    from moerge.errors import MoergeWarning

    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {tiny['ft1']}\n        layer_range: [0, 3]\n"
            "    residual_weight: 0.5\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = moerge.plan(text)
    assert any(issubclass(w.category, MoergeWarning) and "residual_weight has no effect" in str(w.message) for w in caught)
    assert len(plan.tasks) == len(moerge.plan(text.replace("    residual_weight: 0.5\n", "")).tasks)
