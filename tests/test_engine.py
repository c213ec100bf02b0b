import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moerge
from moerge.errors import MoergeError
from moerge.methods import names, registry


def sd(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def recipe_for(method, tiny):
    base, f1, f2, f3 = (str(tiny[k]) for k in ("base", "ft1", "ft2", "ft3"))
    params = {
        "linear": {"weight": 1.0}, "multislerp": {"weight": 1.0}, "nuslerp": {"weight": 1.0},
        "karcher": {}, "model_stock": {}, "passthrough": {}, "slerp": {},
    }.get(method, {"weight": 0.5, "density": 0.6})
    one = ("slerp", "passthrough", "nearswap", "arcee_fusion")  # methods that take one model besides the base
    models = [f1] if method in one else ([f1, f2] if method == "nuslerp" else [f1, f2, f3])
    data_aware = registry.get(method).stats is not None  # fisher, regmean: each model's examples, no base
    if data_aware:
        params = {"weight": 0.5, "data": "reverse"}
    # linear, passthrough and the data-aware methods have no base: a base_model not under models: would join them
    r = {"merge_method": method, **({} if method in ("linear", "passthrough") or data_aware else {"base_model": base}),
         "models": [{"model": m, **({"parameters": params} if params else {})} for m in models]}
    if method in ("slerp", "nearswap"):
        r["parameters"] = {"t": 0.4}
    if data_aware:
        r["parameters"] = {"num_examples": 8}
    return r


@pytest.mark.parametrize("method", names())
def test_every_method_writes_a_loadable_generating_model(method, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))  # data-aware methods' statistics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = moerge.merge(recipe_for(method, tiny), tmp_path / "out")
    out = sd(res.out_dir)
    base = sd(tiny["base"])
    assert set(out) == set(base)
    assert all(out[k].shape == base[k].shape and torch.isfinite(out[k]).all() for k in out)
    model = AutoModelForCausalLM.from_pretrained(res.out_dir)
    tok = AutoTokenizer.from_pretrained(res.out_dir)
    for k, v in model.state_dict().items():  # what transformers loaded is what we wrote
        if k in out:
            assert torch.equal(v, out[k])
    ids = tok("ab", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == ids.shape[1] + 3
    card = (res.out_dir / "README.md").read_text()
    assert method in card and "sha256:" in card and str(tiny["ft1"]) in card
    again = moerge.load_recipe(res.out_dir / "moerge_recipe.yaml")
    assert again.merge_method == method


def test_gradient_and_filter_parameters_follow_mergekit(tiny, tmp_path):
    """weight [0, 1] over 3 layers gives 0, 0.5, 1; a filter overrides by tensor name; t = 0 outside layers."""
    r = {
        "merge_method": "task_arithmetic", "base_model": str(tiny["base"]),
        "models": [{"model": str(tiny["ft1"]), "parameters": {
            "weight": [{"filter": "mlp", "value": 2.0}, {"value": [0.0, 1.0]}]}}],
    }
    out = sd(moerge.merge(r, tmp_path / "o").out_dir)
    b, f = sd(tiny["base"]), sd(tiny["ft1"])
    for k in b:
        if ".mlp." in k:
            w = 2.0
        elif "layers." in k:
            w = int(k.split("layers.")[1].split(".")[0]) / 2
        else:
            w = 0.0
        torch.testing.assert_close(out[k], b[k] + w * (f[k] - b[k]), msg=k)


def test_slices_passthrough_depth_upscaling(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    r = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(tiny["base"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tiny["ft1"]), "layer_range": [1, 3]}]},
    ]}
    res = moerge.merge(r, tmp_path / "up")
    cfg = json.loads((res.out_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    out, b, f = sd(res.out_dir), sd(tiny["base"]), sd(tiny["ft1"])
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.2.self_attn.q_proj.weight"], f["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], f["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], f["model.norm.weight"])
    model = AutoModelForCausalLM.from_pretrained(res.out_dir)
    assert len(model.model.layers) == 4


def test_slices_with_gradient_slerp(tiny, tmp_path):
    r = {"merge_method": "slerp", "base_model": str(tiny["base"]),
         "slices": [{"sources": [{"model": str(tiny["base"]), "layer_range": [0, 3]},
                                 {"model": str(tiny["ft1"]), "layer_range": [0, 3]}]}],
         "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}}
    out, b, f = sd(moerge.merge(r, tmp_path / "s").out_dir), sd(tiny["base"]), sd(tiny["ft1"])
    k0, k2 = "model.layers.0.self_attn.k_proj.weight", "model.layers.2.self_attn.k_proj.weight"
    torch.testing.assert_close(out[k0], b[k0])
    torch.testing.assert_close(out[k2], f[k2])


def test_lora_reference_matches_peft_merge_and_unload(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                     use_rslora=True, alpha_pattern={"down_proj": 16})
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = peft_model.merge_and_unload().state_dict()
    r = {"merge_method": "linear", "models": [{"model": f"{tiny['base']}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}]}
    out = sd(moerge.merge(r, tmp_path / "m").out_dir)
    changed = 0
    for k, v in out.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, sd(tiny["base"])[k])
    assert changed == 3 * 3  # three adapted modules in each of three layers


def test_dtype_out_dtype_and_shards(tiny, tmp_path):
    r = recipe_for("ties", tiny) | {"dtype": "bfloat16", "out_dtype": "float16"}
    res = moerge.merge(r, tmp_path / "o", shard_size=20_000)
    files = list(res.out_dir.glob("model-*-of-*.safetensors"))
    assert len(files) > 1 and (res.out_dir / "model.safetensors.index.json").exists()
    assert {v.dtype for v in sd(res.out_dir).values()} == {torch.float16}
    assert json.loads((res.out_dir / "config.json").read_text())["torch_dtype"] == "float16"


def test_random_methods_are_reproducible_by_seed(tiny, tmp_path):
    r = recipe_for("dare_ties", tiny)
    a = sd(moerge.merge(r, tmp_path / "a", seed=3).out_dir)
    b = sd(moerge.merge(r, tmp_path / "b", seed=3, workers=1).out_dir)
    c = sd(moerge.merge(r, tmp_path / "c", seed=4).out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_shape_mismatch_names_tensor_and_shapes_and_leaves_nothing(tiny, tmp_path):
    from moerge.lm.tiny import make_base

    other = make_base(tmp_path / "wide", hidden=48, layers=3, intermediate=64, tokenizer=False)
    r = {"merge_method": "ties", "base_model": str(tiny["base"]),
         "models": [{"model": str(other), "parameters": {"weight": 1, "density": 0.5}}]}
    with pytest.raises(MoergeError, match=r"shape \[.*48.*\] in .*wide but \[.*32.*\]"):
        moerge.merge(r, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_model_missing_a_tensor(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["ft1"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    r = {"merge_method": "task_arithmetic", "base_model": str(tiny["base"]),
         "models": [{"model": str(broken), "parameters": {"weight": 1}}]}
    with pytest.raises(MoergeError, match=r"broken: lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        moerge.plan(r)


def test_missing_parameter_and_input_counts(tiny):
    r = {"merge_method": "ties", "base_model": str(tiny["base"]), "models": [{"model": str(tiny["ft1"])}]}
    with pytest.raises(MoergeError, match="needs parameter 'weight'"):
        moerge.plan(r)
    r = {"merge_method": "ties", "models": [{"model": str(tiny["ft1"]), "parameters": {"weight": 1}}]}
    with pytest.raises(MoergeError, match="needs a base_model"):
        moerge.plan(r)
    r = {"merge_method": "slerp", "base_model": str(tiny["base"]), "parameters": {"t": 0.5},
         "models": [{"model": str(tiny["ft1"])}, {"model": str(tiny["ft2"])}]}
    with pytest.raises(MoergeError, match="exactly 1 model"):
        moerge.plan(r)


def test_output_must_not_be_an_input_and_inputs_untouched(tiny, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny["ft1"].iterdir()}
    r = recipe_for("ties", tiny)
    with pytest.raises(MoergeError, match="is \\(or contains\\) the input"):
        moerge.merge(r, tiny["ft1"], overwrite=True)
    assert {p.name: p.read_bytes() for p in tiny["ft1"].iterdir()} == before


def test_existing_output_refused_unless_overwrite(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(MoergeError, match="already exists.*--overwrite"):
        moerge.merge(recipe_for("linear", tiny), tmp_path / "out")
    moerge.merge(recipe_for("linear", tiny), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_bin_input_and_plan_summary(tiny, tmp_path):
    bin_dir = tmp_path / "binmodel"
    bin_dir.mkdir()
    torch.save(sd(tiny["ft2"]), bin_dir / "pytorch_model.bin")
    shutil.copy(tiny["ft2"] / "config.json", bin_dir)
    r = {"merge_method": "task_arithmetic", "base_model": str(tiny["base"]),
         "models": [{"model": str(bin_dir), "parameters": {"weight": 1.0}}]}
    plan = moerge.plan(r)
    summary = plan.summary()
    assert "output tensors:" in summary and "output size:" in summary
    out = sd(moerge.merge(r, tmp_path / "o").out_dir)
    f2 = sd(tiny["ft2"])
    assert all(torch.allclose(out[k], f2[k], atol=1e-6) for k in f2)


def test_scheduler_keeps_big_tasks_apart_and_workers_busy():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from moerge.engine.executor import schedule

    sizes = [100, 90, 10, 10, 10, 10, 5, 5]
    live, peak, ran, lock = [0], [0], [], threading.Lock()
    overlapped_small = []

    def job(size):
        with lock:
            live[0] += size
            peak[0] = max(peak[0], live[0])
            if size >= 90 and live[0] > size:
                overlapped_small.append(size)
        time.sleep(0.02 if size < 90 else 0.1)
        with lock:
            live[0] -= size
            ran.append(size)

    with ThreadPoolExecutor(2) as pool:
        schedule(pool, job, sizes, workers=2, cost=lambda s: s, budget=120)
    assert sorted(ran) == sorted(sizes)
    assert peak[0] <= 120  # 100 and 90 never together
    assert ran.index(10) < ran.index(90)  # small tasks ran beside the biggest instead of waiting


def test_scheduler_runs_a_task_larger_than_the_budget_alone_and_reraises():
    from concurrent.futures import ThreadPoolExecutor

    from moerge.engine.executor import schedule

    def job(size):
        if size == 3:
            raise RuntimeError("boom")

    with ThreadPoolExecutor(2) as pool:
        schedule(pool, lambda s: None, [500, 1, 2], workers=2, cost=lambda s: s, budget=100)
        with pytest.raises(RuntimeError, match="boom"):
            schedule(pool, job, [1, 2, 3, 4], workers=2, cost=lambda s: s, budget=100)


def _lora(tiny, folder, seed):
    """A random (non-zero) LoRA adapter of the tiny base, saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(folder)
    return folder


def test_empty_slices_is_a_user_error(tiny):
    with pytest.raises(MoergeError, match=r"line 2: slices: is empty; give at least one slice"):
        moerge.plan("merge_method: passthrough\nslices: []\n")
    with pytest.raises(MoergeError, match="slices: is empty"):
        moerge.plan({"merge_method": "slerp", "base_model": str(tiny["base"]), "slices": [], "parameters": {"t": 0.5}})


def test_recipe_objects_built_in_python_are_checked_too(tiny):
    from moerge.engine.recipe import Recipe

    r = Recipe.model_validate({"merge_method": "ties", "base_model": str(tiny["base"]),
                               "models": [{"model": str(tiny["ft1"]), "parameters": {"weight": 1.0, "density": 3}}]})
    with pytest.raises(MoergeError, match=r"models\[0\]\.parameters\.density: must be in \(0, 1\], got 3"):
        moerge.plan(r)


def test_peft_adapter_given_as_a_model_says_so_with_the_base_plus_adapter_form(tiny, tmp_path):
    adapter = _lora(tiny, tmp_path / "adapter", 0)
    hint = f"`model: {tiny['base']}+{adapter}`"
    for ref, method in ((str(adapter), "linear"), (str(adapter), "task_arithmetic"),
                        (str(adapter / "adapter_model.safetensors"), "task_arithmetic")):
        r = {"merge_method": method, "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
        if method != "linear":
            r["base_model"] = str(tiny["base"])
        with pytest.raises(MoergeError) as e:
            moerge.plan(r)
        msg = str(e.value)
        assert msg.startswith(f"{ref}: is a PEFT adapter (it has adapter_config.json), not a model"), msg
        assert hint in msg and "BASE+path/to/adapter" in msg and "lacks tensor" not in msg and "\n" not in msg
    # as the hint says, it works
    r = {"merge_method": "linear", "models": [{"model": f"{tiny['base']}+{adapter}", "parameters": {"weight": 1.0}}]}
    assert moerge.plan(r).models[0].lora == adapter


def test_missing_model_paths_say_the_path_does_not_exist(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref, want in (("./nope", "./nope: no such file or folder; check the path"),
                      (str(tmp_path / "nope"), f"{tmp_path / 'nope'}: no such file or folder; check the path"),
                      (f"{tiny['base']}+./no-adapter", "./no-adapter: no such file or folder; check the path"),
                      ("org/name", "org/name: no such local folder, and hub model org/name is not in the local hub cache "
                                   "(HF_HUB_OFFLINE is set); check the path, or download it first (`hf download org/name`)")):
        with pytest.raises(MoergeError) as e:
            moerge.plan({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]})
        assert str(e.value) == want


def test_saved_recipe_and_card_pin_the_library_version_merged(tiny, tmp_path):
    import yaml

    from moerge.library import Library

    lib = Library.init(tmp_path / "lib", tiny["base"])
    lib.add(_lora(tiny, tmp_path / "a1", 1), "sort")
    lib.add(_lora(tiny, tmp_path / "a2", 2), "sort")  # sort@2 is the latest
    r = {"merge_method": "task_arithmetic", "base_model": str(tiny["base"]), "dtype": "float32",
         "models": [{"model": "library://sort", "parameters": {"weight": 0.7}},
                    {"model": str(tiny["ft1"]), "parameters": {"weight": [0.1, 0.3]}}]}
    assert "inputs: " in (summary := moerge.plan(r, library=lib.root).summary()) and "library://sort@2" in summary
    first = moerge.merge(r, tmp_path / "first", library=lib.root)
    saved = yaml.safe_load((first.out_dir / "moerge_recipe.yaml").read_text())
    pinned = json.loads(json.dumps(r))
    pinned["models"][0]["model"] = "library://sort@2"
    assert saved == pinned  # faithful to the recipe, with the version actually merged
    card = (first.out_dir / "README.md").read_text()
    assert "library://sort@2" in card and "library://sort\n" not in card and "`library://sort`" not in card
    assert yaml.safe_load(card.split("---")[1])["base_model"][1] == "library://sort@2"

    lib.add(_lora(tiny, tmp_path / "a3", 3), "sort")  # sort@3 arrives later
    again = moerge.merge(first.out_dir / "moerge_recipe.yaml", tmp_path / "again", library=lib.root)
    a, b = sd(first.out_dir), sd(again.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the saved recipe reproduces the merge
    latest = sd(moerge.merge(r, tmp_path / "latest", library=lib.root).out_dir)  # the original now means sort@3
    assert any(not torch.equal(a[k], latest[k]) for k in a)
    assert "library://sort@3" in (tmp_path / "latest" / "moerge_recipe.yaml").read_text()


def test_saved_recipe_pins_hub_ids_to_the_snapshot_commit(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    import yaml

    cache = tmp_path / "hub"
    repo = cache / "models--someorg--base"
    sha = "b" * 40
    shutil.copytree(tiny["base"], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    adapter = _lora(tiny, tmp_path / "adapter", 0)
    r = {"merge_method": "task_arithmetic", "base_model": str(tiny["base"]),
         "models": [{"model": f"someorg/base+{adapter}", "parameters": {"weight": 1.0}},
                    {"model": str(tiny["ft1"]), "parameters": {"weight": 0.5}}]}
    res = moerge.merge(r, tmp_path / "out")
    saved = yaml.safe_load((res.out_dir / "moerge_recipe.yaml").read_text())
    assert saved["models"][0]["model"] == f"someorg/base@{sha}+{adapter}"  # the hub id pinned, the local paths as written
    assert saved["models"][1]["model"] == str(tiny["ft1"]) and saved["base_model"] == str(tiny["base"])
    assert f"someorg/base@{sha}+{adapter}" in (res.out_dir / "README.md").read_text()
    again = moerge.merge(res.out_dir / "moerge_recipe.yaml", tmp_path / "again")
    a, b = sd(res.out_dir), sd(again.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_base_model_not_under_models_joins_methods_without_a_base_as_mergekit_does(tiny, tmp_path):
    """mergekit adds base_model to the inputs of linear and karcher when models: does not list it."""
    import warnings

    from moerge.errors import MoergeWarning

    base, f1, f2 = (str(tiny[k]) for k in ("base", "ft1", "ft2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        joined = sd(moerge.merge({"merge_method": "karcher", "base_model": base, "models": [{"model": f1}, {"model": f2}]},
                                 tmp_path / "k1").out_dir)
    assert any(issubclass(w.category, MoergeWarning) and "joins the karcher merge" in str(w.message) for w in caught)
    listed = sd(moerge.merge({"merge_method": "karcher", "models": [{"model": f1}, {"model": f2}, {"model": base}]},
                             tmp_path / "k2").out_dir)
    without = sd(moerge.merge({"merge_method": "karcher", "models": [{"model": f1}, {"model": f2}]}, tmp_path / "k3").out_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(joined[name], listed[name])
    assert not torch.allclose(joined[name], without[name])
    # linear: the base takes the top-level weight; without one the line says how to give it
    lin = {"merge_method": "linear", "base_model": base, "models": [{"model": f1, "parameters": {"weight": 1.0}}]}
    with pytest.raises(MoergeError, match=r"joins the linear merge as an input and needs 'weight'"):
        moerge.plan(lin)
    out = sd(moerge.merge(lin | {"parameters": {"weight": 3.0}}, tmp_path / "l").out_dir)
    torch.testing.assert_close(out[name], (sd(tiny["ft1"])[name] + 3 * sd(tiny["base"])[name]) / 4)
    with pytest.raises(MoergeError, match="passthrough takes 1 model"):
        moerge.plan({"merge_method": "passthrough", "base_model": base, "models": [{"model": f1}]})


def test_folders_whose_names_hold_a_plus_are_folders(tiny, tmp_path):
    """``base+adapter`` splits on +; a folder named with a + is still a folder (issue 31), as a model,
    as the model side of base+adapter and as the adapter side, in the short and the long form."""
    base = tmp_path / "my+base"
    shutil.copytree(tiny["base"], base)
    adapter = _lora(tiny, tmp_path / "lo+ra", seed=3)
    plain = shutil.copytree(adapter, tmp_path / "plain")  # the same adapter under a plain name: the reference
    recipe = {"merge_method": "passthrough", "models": [{"model": f"{tiny['base']}+{plain}"}]}
    want = load_file(moerge.merge(recipe, tmp_path / "w").out_dir / "model.safetensors")
    for i, ref in enumerate([f"{base}+{adapter}", {"model": {"path": str(base)}, "lora": {"path": str(adapter)}}]):
        got = load_file(moerge.merge({"merge_method": "passthrough", "models": [{"model": ref}]}, tmp_path / f"o{i}").out_dir
                        / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    alone = load_file(moerge.merge({"merge_method": "passthrough", "models": [{"model": str(base)}]}, tmp_path / "b").out_dir
                      / "model.safetensors")
    assert all(torch.equal(alone[k], v) for k, v in load_file(tiny["base"] / "model.safetensors").items())
