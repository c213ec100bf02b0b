"""LoRA-native merging (issue 33): LoRA experts merged into a LoRA in their core space (or KnOTS', or
materialised). The bases are lossless, the rotation-invariant methods equal their dense merge, the
result loads in PEFT with the logits of the dense merge, and its card carries lineage and centroids."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.engine.lora_merge import METHODS, ROTATION_INVARIANT, lora_method, merge_updates, resolve_params
from moerge.errors import MoergeError
from moerge.experts.kinds import LowRank
from moerge.experts.lowrank import core_space, knots_space

runner = CliRunner()


def updates(ranks, m=14, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), 0.5 + i) for i, r in enumerate(ranks)]


@settings(max_examples=25, deadline=None)
@given(ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4), m=st.integers(2, 16), n=st.integers(2, 16),
       seed=st.integers(0, 1000))
def test_core_and_knots_spaces_give_back_every_update_exactly(ranks, m, n, seed):
    ups = updates(ranks, m, n, seed)
    left, right, cores = core_space(ups)
    assert left.shape[1] <= min(m, sum(ranks)) and right.shape[1] <= min(n, sum(ranks))
    torch.testing.assert_close(left.T @ left, torch.eye(left.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
    us, vs = knots_space(ups)
    for u, c, v in zip(ups, cores, vs):
        torch.testing.assert_close(left @ c @ right.T, u.delta().double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(us @ v.T, u.delta().double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ROTATION_INVARIANT)
def test_rotation_invariant_methods_in_core_space_equal_their_dense_merge(name):
    ups = updates([3, 2, 4], m=20, n=12)  # ranks differ
    m = lora_method(name)
    shared, per = resolve_params(m, {"alpha": 1.3} if m.param("alpha") else None, 3)
    core, kept = merge_updates(ups, m, shared, per, space="core", name="layers.0.q_proj.weight")
    deltas = [u.delta() for u in ups]
    kwargs = dict(shared) | per | ({"name": "layers.0.q_proj.weight"} if m.extra.get("tensor_name") else {})
    want = m(torch.zeros(20, 12), deltas, **kwargs)  # the dense method on the materialised changes
    assert kept == pytest.approx(1.0) and core.rank <= 9
    torch.testing.assert_close(core.delta(), want, atol=2e-4, rtol=2e-4)
    full, _ = merge_updates(ups, m, shared, per, space="full", name="layers.0.q_proj.weight")
    torch.testing.assert_close(full.delta(), want, atol=2e-4, rtol=2e-4)


def test_one_expert_in_is_that_expert_out_and_the_order_does_not_matter():
    ups = updates([3, 2, 4])
    for name in ("task_arithmetic", "tsv", "ties", "dare_ties", "wudi"):
        m = lora_method(name)  # at alpha 1, nothing dropped (the LoRA defaults scale and drop)
        shared, per = resolve_params(m, {"alpha": 1.0} if m.param("alpha") else {"density": 1.0} if m.param("density") else None, 1)
        for space in ("core", "knots"):
            one, _ = merge_updates(ups[:1], m, shared, per, space=space, name="x.weight",
                                   generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(one.delta(), ups[0].delta(), atol=1e-4, rtol=1e-4, msg=f"{name} {space}")
    for name in ("ties", "iso_cts", "tsv"):  # the core basis is the stack's principal directions, whatever its order
        m = lora_method(name)
        shared, per = resolve_params(m, {"density": 0.5} if m.param("density") else None, 3)
        a, _ = merge_updates(ups, m, shared, per, name="x.weight")
        b, _ = merge_updates(ups[::-1], m, shared, per, name="x.weight")
        torch.testing.assert_close(a.delta(), b.delta(), atol=1e-4, rtol=1e-4, msg=name)


def test_a_rank_cut_keeps_the_best_approximation_and_reports_its_energy():
    ups = updates([4, 4])
    m = lora_method("task_arithmetic")
    shared, per = resolve_params(m, None, 2)
    cut, kept = merge_updates(ups, m, shared, per, rank=3, name="x.weight")
    want = ups[0].delta() + ups[1].delta()
    s = torch.linalg.svdvals(want.double())
    assert cut.rank == 3 and kept == pytest.approx(float(s[:3].square().sum() / s.square().sum()), rel=1e-6)
    assert float((cut.delta() - want).norm()) == pytest.approx(float(s[3:].square().sum().sqrt()), rel=1e-4)


def test_parameters_are_checked_as_a_recipe_s_are():
    m = lora_method("ties")
    shared, per = resolve_params(m, {"density": "0.4", "weight": [1, "0.5"]}, 2)
    assert per["density"] == [0.4, 0.4] and per["weight"] == [1.0, 0.5] and shared["lambda"] == 1.0
    with pytest.raises(MoergeError, match="3 values of weight for 2 experts"):
        resolve_params(m, {"weight": [1, 1, 1]}, 2)
    with pytest.raises(MoergeError, match=r"density must be in \(0, 1\]"):
        resolve_params(m, {"density": 2}, 2)
    with pytest.raises(MoergeError, match="no parameter 'alpah'; it takes"):
        resolve_params(lora_method("iso_c"), {"alpah": 1}, 2)
    with pytest.raises(MoergeError, match="cannot merge LoRA experts into a LoRA.*iso_cts"):
        lora_method("slerp")
    assert set(ROTATION_INVARIANT) <= set(METHODS)


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """Three PEFT LoRAs of the tiny base (ranks 4, 4, 2), with cards carrying task centroids."""
    from moerge.experts.card import ExpertCard
    from moerge.io.fingerprint import folder_fingerprint
    from moerge.lm.tiny import make_random_adapter

    root = tmp_path_factory.mktemp("loramerge")
    out = []
    for i, r in enumerate((4, 4, 2)):
        folder = make_random_adapter(tiny["base"], root / f"a{i}", seed=10 + i, rank=r)
        ExpertCard(task=f"t{i}", adapter="lora", base=str(tiny["base"]), base_fingerprint=folder_fingerprint(tiny["base"]),
                   rank=r, centroid=[float(i), 1.0], centroids=[[float(i), 1.0], [float(i), 2.0]]).write(folder)
        out.append(folder)
    return out


def logits(model_dir, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(torch.arange(1, 17).reshape(2, 8)).logits


def test_expert_merge_writes_a_peft_lora_with_the_dense_merge_s_logits_and_its_lineage(tiny, adapters, tmp_path):
    out = tmp_path / "merged"
    res = runner.invoke(app, ["expert", "merge", *map(str, adapters), "--out", str(out), "--method", "iso_c",
                              "--param", "alpha=1.5"])
    assert res.exit_code == 0, res.output
    assert "3 experts merged by iso_c in core space" in res.output
    report = json.loads((out / "moerge_merge.json").read_text())
    assert max(report["ranks"].values()) <= 10 and report["params"] == {"alpha": 1.5}
    # the dense counterpart, merged by the engine from the recipe the report gives, computes the same function
    (tmp_path / "dense.yaml").write_text(report["dense_recipe"])
    moerge.merge(tmp_path / "dense.yaml", tmp_path / "dense")
    torch.testing.assert_close(logits(tiny["base"], out), logits(tmp_path / "dense"), atol=2e-4, rtol=1e-3)
    card = json.loads((out / "expert.json").read_text())
    lineage = card["extra"]["merged_from"]
    assert [p["task"] for p in lineage["inputs"]] == ["t0", "t1", "t2"] and lineage["method"] == "iso_c"
    assert all(p["digest"].startswith("sha256:") for p in lineage["inputs"])
    assert card["task"] == "t0+t1+t2" and len(card["centroids"]) == 6 and card["centroid"] == [1.0, 1.5]
    # and it is an expert like any other: the base check and a second merge take it
    res = runner.invoke(app, ["expert", "merge", str(out), str(adapters[0]), "--out", str(tmp_path / "again"),
                              "--method", "ties", "--param", "density=0.5", "--space", "knots", "--rank", "3"])
    assert res.exit_code == 0 and "rank 3" in res.output, res.output
    # a rank above what the core space holds is said, not silently capped
    res = runner.invoke(app, ["expert", "merge", *map(str, adapters), "--out", str(tmp_path / "big"), "--rank", "99"])
    assert res.exit_code == 0 and "rank 99: above the experts' combined rank (10" in res.output, res.output


def test_expert_merge_into_a_library_and_from_it(tiny, adapters, tmp_path):
    from moerge.library.store import Library

    lib = Library.init(tmp_path / "lib", tiny["base"])
    for i, a in enumerate(adapters[:2]):
        lib.add(a, f"e{i}")
    res = runner.invoke(app, ["expert", "merge", "library://e0", "library://e1@1", "--library", str(lib.root),
                              "--out", str(tmp_path / "m"), "--add", "both"])
    assert res.exit_code == 0, res.output
    assert "added to the library as both@1" in res.output
    entry = lib.get("both")
    assert entry.task == "t0+t1"
    assert entry.card["extra"]["merged_from"]["params"] == {"alpha": 2.0, "common": 0.8}  # iso_cts, LoRA defaults
    assert [p["ref"] for p in entry.card["extra"]["merged_from"]["inputs"]] == ["library://e0@1", "library://e1@1"]
    from moerge.fusion.fuse import plan_fuse  # fusing it beside its inputs would count their skills twice

    notes = " ".join(plan_fuse(lib).notes)
    assert "both@1 was merged from e0@1, e1@1, fused beside it" in notes
    # --overwrite never replaces the library, or anything in it
    for target in (lib.root, lib.root / "blobs"):
        res = runner.invoke(app, ["expert", "merge", "library://e0", "library://e1", "--library", str(lib.root),
                                  "--out", str(target), "--overwrite"])
        assert res.exit_code != 0 and "--overwrite would delete experts" in " ".join(res.output.split()), res.output
    assert lib.verify() == ([], []) and lib.get("e0").ref == "e0@1"
    torch.testing.assert_close(lib.load("both").updates[next(iter(lib.load("both").updates))].a,
                               load_file(tmp_path / "m" / "adapter_model.safetensors")[
                                   next(k for k in sorted(load_file(tmp_path / "m" / "adapter_model.safetensors")) if "lora_A" in k)])


def test_expert_merge_refuses_bad_input_in_one_line(tiny, adapters, expert, tmp_path):
    def fails(*args, match):
        res = runner.invoke(app, ["expert", "merge", *map(str, args)])
        assert res.exit_code != 0 and "Traceback" not in res.output, res.output
        assert match in " ".join(res.output.split()), res.output

    out = ["--out", str(tmp_path / "o")]
    fails(adapters[0], adapters[1], *out, "--method", "slerp", match="cannot merge LoRA experts into a LoRA")
    fails(adapters[0], adapters[1], *out, "--param", "density", match="write NAME=VALUE")
    fails(adapters[0], adapters[1], *out, "--param", "alpha=-1", match="alpha must be in [0, inf]")
    fails(adapters[0], adapters[1], *out, "--rank", "0", match="rank 0: give a rank of at least 1")
    fails(adapters[0], adapters[1], *out, "--space", "diag", match="space 'diag': choose one of core, knots, full")
    fails(adapters[0], tmp_path / "nope", *out, match="no such adapter folder")
    fails(adapters[0], expert, *out, match="made for another base")  # an expert of the built-in base, not the tiny one
    before = (adapters[1] / "adapter_model.safetensors").read_bytes()
    fails(adapters[0], adapters[1], "--out", str(adapters[1]), "--overwrite", match=str(adapters[1]))
    assert (adapters[1] / "adapter_model.safetensors").read_bytes() == before  # an input is never overwritten
    fails(adapters[0], adapters[1], *out, "--add", "bad name", match="not a valid expert name")
    fails(adapters[0], *out, match="give two or more LoRA experts")
    fails(adapters[0], adapters[0], *out, match="are the same expert")
    fails(adapters[0], adapters[1], *out, "--budget", "3", match="add --search PARAMS")
    fails(adapters[0], adapters[1], *out, "--method", "isoc", match="did you mean iso_c?")
    fails(adapters[0], adapters[1], *out, "--method", "task_arithmetic", "--param", "weight=[1,1]", "--search", "weight",
          match="start it from one number (e.g. --param weight=1)")
    assert not (tmp_path / "o").exists()


def test_search_tunes_alpha_on_the_experts_own_validation_rows_and_the_card_records_it(expert, tmp_path):
    from moerge.search.lora import own_tasks
    from moerge.train.expert import train_expert

    twin = tmp_path / "reverse"
    train_expert(twin, task="reverse", steps=3, n_train=64, batch_size=16, progress=False)
    assert own_tasks([json.loads((expert / "expert.json").read_text())]) == ["sort"]
    with pytest.raises(MoergeError, match="names no data of its own"):
        own_tasks([{"task": "mine"}])
    merged = {"task": "sort+reverse", "extra": {"merged_from": {"inputs": [{"task": "sort", "data": "moerge:sort"},
                                                                             {"task": "reverse", "data": "moerge:reverse"}]}}}
    assert own_tasks([merged]) == ["sort", "reverse"]  # a merged expert searches on its inputs' data
    res = runner.invoke(app, ["expert", "merge", str(expert), str(twin), "--out", str(tmp_path / "m"), "--method", "iso_c",
                              "--param", "alpha=0.5", "--search", "alpha", "--budget", "3", "--n", "4"])
    assert res.exit_code == 0, res.output
    assert "searched" in res.output and "against alpha=0.5" in res.output
    lineage = json.loads((tmp_path / "m" / "expert.json").read_text())["extra"]["merged_from"]
    found = lineage["search"]
    assert found["tasks"] == ["sort", "reverse"] and found["split"] == "validation" and found["tuned"] == ["alpha"]
    assert found["candidates"][0]["values"] == {"alpha": 0.5}  # the value as given is tried first
    assert found["as_given"] == {"alpha": 0.5} and found["validation"]["best"] >= found["validation"]["as_given"]
    assert lineage["params"]["alpha"] == found["best"]["alpha"]  # the expert written is the best candidate
    assert max(c["score"] for c in found["candidates"]) == found["validation"]["best"]
    with pytest.raises(MoergeError, match="--search common2: iso_c has no such number to tune; it has alpha"):
        moerge.merge_lora([expert, twin], tmp_path / "x", method="iso_c", search=["common2"], budget=1, n=1)


def test_a_candidate_s_change_replaces_the_last_one_and_equals_the_change_in_the_weights(tiny, adapters):
    from moerge.engine.lora_merge import merge_lora
    from moerge.experts.patch import Patched
    from moerge.experts.peft_format import load_adapter
    from moerge.io.source import open_source
    from moerge.lm import base as base_model

    experts = [load_adapter(a, open_source(str(tiny["base"]))) for a in adapters[:2]]
    model, _ = base_model.load(tiny["base"], dtype=torch.float32)
    ref, _ = base_model.load(tiny["base"], dtype=torch.float32)
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        before = model(ids).logits
    patched = Patched(model)
    patched.apply(merge_lora(experts, "task_arithmetic", {"lambda": 3.0}).updates)
    second = merge_lora(experts, "task_arithmetic", {"lambda": 0.5}, rank=2)
    patched.apply(second.updates)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, u in second.updates.items():
            params[name].add_(u.delta())
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-4)
        patched.remove()
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
