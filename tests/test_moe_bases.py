"""MoE bases as first-class bases (issue 31): Mixtral, Qwen2-MoE and Qwen3-MoE, tiny and random-init.

Their checkpoints store each expert's projections as separate tensors (``experts.3.w1.weight``) while
the loaded model stacks them (``experts.gate_up_proj``, (K, 2·I, H)), and PEFT trains LoRA on the
stacks as parameters (``target_parameters``). An expert trained on such a base is read, merged,
routed and served exactly as PEFT applies it: each check below compares with PEFT's own model."""

import json

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.errors import MoergeError
from moerge.lm.tiny import MOE_FAMILIES, make_base, make_random_adapter
from moerge.routing import load_routed
from moerge.train.expert import peft_config

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45], [1, 60, 61, 62, 63, 64, 65]])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Per family: the base, and two LoRA experts made by PEFT with random B (nothing is zero)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in MOE_FAMILIES:
        base = make_base(root / arch, arch=arch, hidden=32, intermediate=64)
        out[arch] = (base, [make_random_adapter(base, root / f"{arch}-{seed}", seed=seed) for seed in (0, 1)])
    return out


def peft_model(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_an_moe_expert_adapts_the_stacked_experts_and_merges_as_peft_does(arch, moe, tmp_path):
    base, (x, _) = moe[arch]
    saved = json.loads((x / "adapter_config.json").read_text())
    assert {"experts.gate_up_proj", "experts.down_proj"} <= {p if "." in p else f"experts.{p}" for p in saved["target_parameters"]}
    r = {"merge_method": "passthrough", "models": [{"model": f"{base}+{x}"}]}
    out = load_file(moerge.merge(r, tmp_path / "m").out_dir / "model.safetensors")
    peft_model(base, x).merge_and_unload().save_pretrained(tmp_path / "want")  # saved as the checkpoint stores it
    want, before = load_file(tmp_path / "want" / "model.safetensors"), load_file(base / "model.safetensors")
    assert set(out) == set(want)
    for k in out:
        torch.testing.assert_close(out[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{arch}: {k}")
    changed = {k for k in out if not torch.equal(out[k], before[k])}
    assert any(".experts.3." in k for k in changed), f"{arch}: the base's experts were not changed: {sorted(changed)[:5]}"


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_the_mixture_runtime_routes_lora_on_stacked_experts_and_the_router_exactly(arch, moe, tmp_path):
    from transformers import AutoModelForCausalLM

    from moerge.routing.stacked import MixtureExperts, MixtureParam

    base, (x, y) = moe[arch]
    routed = load_routed("uniform", experts=[x], base=base)
    kinds = {type(layer).__name__ for layer in routed.layers.values()}
    assert {MixtureExperts.__name__, "MixtureLinear"} <= kinds
    if arch != "qwen2_moe":  # PEFT also adapts Mixtral's and Qwen3-MoE's router weight (a parameter, not a layer)
        assert MixtureParam.__name__ in kinds
    with torch.no_grad():
        torch.testing.assert_close(routed(IDS).logits, peft_model(base, x)(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)
    routed.detach()
    # two experts, half each: the logits of their linear merge (W + Δx/2 + Δy/2, through every stack)
    r = {"merge_method": "linear", "models": [{"model": f"{base}+{e}", "parameters": {"weight": 0.5}} for e in (x, y)]}
    merged = AutoModelForCausalLM.from_pretrained(moerge.merge(r, tmp_path / "half").out_dir).eval()
    routed = load_routed("uniform", experts=[x, y], base=base)
    with torch.no_grad():
        torch.testing.assert_close(routed(IDS).logits, merged(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)
    # the token routers score the MoE layers too: Arrow from the stacked factors
    arrow = load_routed("arrow", experts=[x, y], base=base)
    experts_module = next(n for n, layer in arrow.layers.items() if isinstance(layer, MixtureExperts))
    assert arrow.router.protos[experts_module].shape == (2, 32) and bool(arrow.router.protos[experts_module].any())
    arrow.state.record = True
    with torch.no_grad():
        arrow(IDS)
    assert float(arrow.state.usage[experts_module].sum()) == pytest.approx(IDS.numel())  # every token weighed once


def test_phatgoose_gates_are_trained_on_the_moe_layers_too(moe):
    from moerge.lm.example import Example
    from moerge.routing.routers.phatgoose import train_gates

    base, (x, _) = moe["mixtral"]
    rows = [Example("sort: cba=", "abc")] * 4
    gates = train_gates(x, base=base, steps=2, batch_size=2, rows=rows)
    assert any(k.endswith("mlp.experts") for k in gates) and any(k.endswith("mlp.gate") for k in gates)
    assert all(g.shape == (32,) for g in gates.values())


def test_checkpoint_names_round_trip_on_every_moe_family(moe):
    """The loaded model's parameters, cut back into the checkpoint's pieces, are the checkpoint; and
    read from it, the model's (what the engine uses to run a merge's inputs and its Fisher)."""
    from transformers import AutoModelForCausalLM

    from moerge.io.source import open_source
    from moerge.lm.arch import as_stored, checkpoint_reader

    for arch, (base, _) in moe.items():
        model = AutoModelForCausalLM.from_pretrained(base)
        stored = load_file(base / "model.safetensors")
        params = dict(model.named_parameters())
        assert any(p.dim() == 3 for p in params.values())
        back = as_stored(model.config.model_type, params, list(stored))
        assert set(back) == set(stored) and all(torch.equal(back[k], stored[k]) for k in stored), arch
        read = checkpoint_reader(model.config.model_type, open_source(base))
        assert all(torch.equal(read(n), p) for n, p in params.items()), arch
        assert read("model.layers.0.no_such.weight") is None


def test_moe_adapters_refused_in_one_line_where_they_cannot_be_read(moe, tmp_path):
    from moerge.experts.peft_format import load_adapter, parse_adapter, read_adapter
    from moerge.io.source import open_source

    base, (x, _) = moe["mixtral"]
    # a checkpoint alone, without the config.json that says how the model stacks its experts
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    config, tensors = read_adapter(x)
    with pytest.raises(MoergeError, match=r"LoRA on parameters of 'model.layers.0.mlp.experts' .*needs the base's config.json"):
        parse_adapter(config, tensors, open_source(tmp_path / "bare"))
    expert = parse_adapter(config, tensors, open_source(tmp_path / "bare"), model_dir=base)  # as `git add --lora` reads it
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in expert.updates
    # an MoE expert on a dense base of the same width
    dense = make_base(tmp_path / "llama", hidden=32, intermediate=64)
    with pytest.raises(MoergeError, match="another base"):
        load_adapter(x, open_source(dense))
    # `expert combine` writes plain LoRA layers only: an MoE expert is refused, not written unreadable
    from moerge.experts.peft_format import combine_folders

    with pytest.raises(MoergeError, match="an expert of an MoE base .*merge such experts with `moerge merge`"):
        combine_folders([x, moe["mixtral"][1][1]], base, tmp_path / "combined")
    assert not (tmp_path / "combined").exists()
    # DoRA cannot train on stacked parameters (PEFT)
    from transformers import AutoModelForCausalLM

    with pytest.raises(MoergeError, match="DoRA on mixtral: .*use --adapter lora"):
        peft_config("dora", 4, AutoModelForCausalLM.from_pretrained(base))


def test_the_mixture_runtime_refuses_experts_that_compute_otherwise(moe):
    from transformers import AutoModelForCausalLM

    from moerge.experts.kinds import StackedLowRank
    from moerge.routing.mixture import RoutingState
    from moerge.routing.stacked import MixtureExperts, Rows

    base, _ = moe["mixtral"]
    experts = AutoModelForCausalLM.from_pretrained(base).model.layers[0].mlp.experts

    class Doubled(type(experts)):
        def forward(self, *args):
            return 2 * super().forward(*args)

    experts.__class__ = Doubled
    k, out2, h = experts.gate_up_proj.shape
    u = {"gate_up_proj": StackedLowRank(torch.zeros(k, 2, h), torch.zeros(k, out2, 2), 1.0)}
    with pytest.raises(MoergeError, match="compute otherwise .* merge these experts instead"):
        MixtureExperts(experts, "model.layers.0.mlp.experts", [u], RoutingState(), Rows())


def test_serving_an_moe_base_answers_each_expert_as_peft_does_in_one_batch(moe):
    """Two experts' requests at once share batches (each row its own expert through the stacked
    experts and the router) and answer as PEFT's model with that adapter alone."""
    import threading

    from openai import OpenAI
    from transformers import AutoTokenizer

    from moerge.eval import greedy
    from moerge.serve import Server

    base, (x, y) = moe["qwen3_moe"]
    tok = AutoTokenizer.from_pretrained(base)
    prompts = {x.name: "sort: dcba=", y.name: "reverse: hello="}
    want = {n: greedy(peft_model(base, e).merge_and_unload(), tok, [prompts[n]], max_new_tokens=8)[0]
            for n, e in ((x.name, x), (y.name, y))}
    with Server(experts=[str(x), str(y)], base=str(base), routers=["uniform"], max_batch=4) as s:
        c = OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        got = {}

        def ask(name):
            got[name] = c.completions.create(model=name, prompt=prompts[name], max_tokens=8, temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(n,)) for n in prompts for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == want
        r = c.completions.create(model="router:uniform", prompt=prompts[x.name], max_tokens=4, temperature=0)
        assert r.model_extra["experts"] and r.choices[0].text is not None
    with Server(experts=[str(x), str(y)], routers=["uniform"]) as s:  # no --base: the one the adapters were made on
        ids = [m.id for m in OpenAI(base_url=s.url, api_key="unused", max_retries=0).models.list().data]
        assert base.name in ids and "moerge-tiny" not in ids


def test_library_eval_and_a_fusion_round_on_an_moe_base(moe, tmp_path):
    """The library keeps MoE experts like any other, eval applies one as PEFT does, and a fusion round
    (average of the two experts) writes base@2 with every stored expert tensor moved by both."""
    from moerge.api import evaluate
    from moerge.fusion import fuse
    from moerge.library import Library

    base, (x, y) = moe["qwen2_moe"]
    lib = Library.init(tmp_path / "lib", base)
    lib.add(x, "x", task="sort")
    lib.add(y, "y", task="reverse")
    assert {e.name for e in lib.experts()} == {"x", "y"}
    copy = lib.load(lib.get("x").ref)  # read back from the blob store against the base
    assert any(".experts.1.up_proj" in k for k in copy.updates)
    scores = evaluate(base, adapter=x, tasks="sort", n=4)
    assert set(scores.scores) == {"sort"}
    res = fuse(lib, method="average")
    new = load_file(next(res.base.path.glob("*.safetensors")))
    old = load_file(base / "model.safetensors")
    ex = [k for k in old if ".mlp.experts.2." in k]
    assert ex and all(not torch.equal(new[k], old[k]) for k in ex)


def test_a_full_fine_tune_scored_with_a_base_must_be_of_that_base(moe, tmp_path):
    """`eval BASE --adapter FULL`: a full fine-tune of another base is refused, not scored and labelled
    with the base given; expert folders routed without --base use the base their cards name."""
    from moerge.api import evaluate, train_expert
    from moerge.routing import load_routed

    base, _ = moe["mixtral"]
    train_expert(tmp_path / "full", base=base, task="sort", adapter="full", steps=1, n_train=8, batch_size=4, n_val=20,
                 progress=False)
    train_expert(tmp_path / "lora", base=base, task="sort", steps=1, n_train=8, batch_size=4, n_val=20, progress=False)
    other = make_base(tmp_path / "llama", hidden=32, intermediate=64)
    with pytest.raises(MoergeError, match="another base"):
        evaluate(other, adapter=tmp_path / "full", tasks="sort", n=2)
    assert evaluate(base, adapter=tmp_path / "full", tasks="sort", n=2).scores.keys() == {"sort"}
    routed = load_routed("uniform", experts=[tmp_path / "lora"])  # no base given: the card's, not the built-in one
    assert routed.model.config.model_type == "mixtral"


def test_extract_from_an_moe_fine_tune_keeps_what_peft_can_load(moe, tmp_path):
    """`expert extract` writes LoRA on the linear layers the loaded model has; the experts and router,
    stored per expert but stacked in the model, are listed as not extracted, with the reason."""
    from moerge.api import evaluate
    from moerge.experts.extract import extract_lora
    from moerge.lm.tiny import make_finetune

    base, _ = moe["mixtral"]
    ft = make_finetune(base, tmp_path / "ft", seed=3)
    r = extract_lora(ft, base, tmp_path / "ex", rank=2)
    assert r.layers and all("block_sparse_moe" not in layer["module"] for layer in r.layers)
    assert any(".experts.0.w1" in s["tensor"] and "MoE" in s.get("why", "") for s in r.skipped)
    assert evaluate(base, adapter=tmp_path / "ex", tasks="sort", n=2).scores.keys() == {"sort"}  # PEFT loads it


def test_an_offloaded_moe_base_routes_as_the_whole_one(moe, monkeypatch):
    """`--device-map auto` with less memory than the model: the stacked experts and the router are
    offloaded, and the mixture runtime reads them as each layer runs; the logits are the whole model's."""
    from moerge.lm.device import MAP_ENV, MEMORY_ENV, offloaded

    base, experts = moe["qwen3_moe"]
    with torch.no_grad():
        want = load_routed("arrow", experts=experts, base=base)(IDS).logits
    monkeypatch.setenv(MAP_ENV, "auto")
    monkeypatch.setenv(MEMORY_ENV, "cpu=100KB")
    routed = load_routed("arrow", experts=experts, base=base)
    assert offloaded(routed.model)
    with torch.no_grad():
        torch.testing.assert_close(routed(IDS).logits, want, rtol=1e-4, atol=1e-5)
