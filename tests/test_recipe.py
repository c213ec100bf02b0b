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
    ("merge_method: ties\nmodels:\n  - model: a\n    parameters: {dens1ty: 1}\n", r"line 4: models\[0\]\.parameters\.dens1ty: unknown parameter \(ties takes: weight, density"),
    ("merge_method: slerp\nmodels: [{model: a}]\nparameters: {t: 2}\n", r"line 3: parameters\.t: must be in \[0, 1\], got 2"),
    ("merge_method: ties\nmodels: [{model: a}]\nparameters: {normalize: maybe}\n", r"parameters\.normalize: must be true or false"),
    ("merge_method: ties\n", r"give exactly one of models: or slices:"),
    ("merge_method: ties\nmodels: [{model: a}]\nslices: []\n", r"give exactly one"),
    ("merge_method: ties\nmodules: {x: 1}\nmodels: [{model: a}]\n", r"modules:\) are not supported yet"),
    ("merge_method: ties\nmodels: [{model: a}]\ntokenizer: {source: base}\n", r"tokenizer: block .* not supported yet"),
    ("merge_method: ties\nmodels: [{model: a}]\ndtype: int4\n", r"line 3: dtype: unknown dtype 'int4'"),
    ("models: [{model: a}]\n", r"merge_method: required key is missing"),
    ("merge_method: ties\nmodels:\n  - model: a\n   bad: [\n", r"not valid YAML"),
    ("- just\n- a list\n", r"a recipe is a YAML mapping"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [4, 2]\n", r"line 5: slices\[0\]\.sources\[0\]\.layer_range: must be"),
    ("merge_method: della\nmodels: [{model: a, parameters: {epsilon: 0.7}}]\n", r"epsilon: must be in \[0, 0.5\)"),
    ("merge_method: ties\nmodels: [{model: a}]\nchat_template: llama9\n", r"chat_template: give a Jinja template or 'chatml'"),
])
def test_bad_recipes_give_one_line_with_key_and_line(text, message):
    with pytest.raises(MoergeError, match=message) as e:
        parse_recipe(text, "r.yaml")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("r.yaml")
