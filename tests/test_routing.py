"""The mixture runtime against merged weights, the routers' weights, and the route CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from moerge.api import train_expert
from moerge.cli import app
from moerge.errors import MoergeError
from moerge.lm import base as base_model
from moerge.routing import RoutedModel, load_routed
from moerge.routing.registry import ExampleRouter, get


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rexperts")
    for task, rank in (("reverse", 4), ("uppercase", 2), ("novowels", 8)):  # different ranks in one bank
        train_expert(root / task, task=task, steps=3, rank=rank, n_train=64, batch_size=16, progress=False)
    return [root / t for t in ("reverse", "uppercase", "novowels")]


class Fixed(ExampleRouter):
    """Per-example weights given by the test."""
    name = "fixed"

    def __init__(self, w):
        super().__init__()
        self.w = w

    def example_weights(self, routed, prompts, input_ids, attention_mask):
        return self.w


def merged_model(experts, weights):
    """The base with W + Σ w_e ΔW_e written into its weights: what the mixture must equal."""
    from moerge.experts import load_adapter
    from moerge.io.source import open_source

    model, tok = base_model.load()
    src = open_source(base_model.default_base())
    sd = model.state_dict()
    base = {k: v.clone() for k, v in sd.items()}  # every delta is taken against the base (DoRA's, (IA)3's depend on it)
    with torch.no_grad():
        for folder, w in zip(experts, weights):
            for name, u in load_adapter(folder, src).updates.items():
                sd[name] += w * u.delta(base[name])
    model.load_state_dict(sd)
    return model, tok


def routed(experts, router):
    from moerge.experts import load_adapter
    from moerge.io.source import open_source

    model, tok = base_model.load()
    src = open_source(base_model.default_base())
    return RoutedModel(model, tok, [load_adapter(f, src) for f in experts], [{"task": f.name} for f in experts], router)


def rows_match_merged(rm, bank, rows, ids, mask):
    """Each row of the routed batch equals the model with that row's weights merged in; the logits."""
    with torch.no_grad():
        got = rm(ids, mask).logits
        for i in range(len(rows)):
            ref, _ = merged_model(bank, rows[i].tolist())
            torch.testing.assert_close(got[i: i + 1], ref(input_ids=ids[i: i + 1], attention_mask=mask[i: i + 1]).logits,
                                       rtol=1e-4, atol=1e-4)
    return got


def test_batched_mixture_equals_each_rows_merged_model(experts):
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    rm = routed(experts, Fixed(rows))
    ids, mask = rm.tokenizer(["reverse: abc=", "flip: xyzw=", "shout: q="], add_special_tokens=False,
                             return_tensors="pt", padding=True).values()
    rows_match_merged(rm, experts, rows, ids, mask)


def test_generate_with_kv_cache_matches_the_merged_model(experts):
    from moerge.eval import greedy

    w = torch.tensor([[0.0, 1.0, 0.0]] * 4)
    rm = routed(experts, Fixed(w))
    prompts = ["reverse: abc=", "uppercase: hello=", "drop vowels: banana=", "sort: dcba="]
    ref, tok = merged_model(experts, [0.0, 1.0, 0.0])
    assert greedy(rm, tok, prompts) == greedy(ref, tok, prompts)


def test_routers_weights(experts):
    from moerge.lm.generate import encode_left_padded

    prompts = ["reverse: abc=", "capitalize: hey=", "no vowels: audio=", "flip then shout: abc=", "sort: cba="]
    oracle = load_routed("oracle", experts=experts)
    ids, mask = encode_left_padded(oracle.tokenizer, prompts)
    w = oracle.router.example_weights(oracle, prompts, ids, mask)
    torch.testing.assert_close(w, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [1 / 3] * 3]))
    uni = load_routed("uniform", experts=experts)
    assert torch.allclose(uni.router.example_weights(uni, prompts, ids, mask), torch.full((5, 3), 1 / 3))
    cen = load_routed("centroid", experts=experts, top_k=1)
    cw = cen.router.example_weights(cen, prompts, ids, mask)
    assert torch.equal((cw > 0).sum(1), torch.ones(5, dtype=torch.long)) and torch.allclose(cw.sum(1), torch.ones(5))
    arrow = load_routed("arrow", experts=experts, top_k=2)
    x = torch.randn(2, 7, arrow.layers["model.layers.0.self_attn.q_proj"].a.shape[2])
    aw = arrow.router.token_weights("model.layers.0.self_attn.q_proj", x)
    assert aw.shape == (2, 7, 3) and torch.allclose(aw.sum(-1), torch.ones(2, 7)) and bool(((aw > 0).sum(-1) <= 2).all())
    usage = arrow.usage(prompts)
    assert usage.shape == (3,) and abs(float(usage.sum()) - 1) < 1e-5


def test_arrow_prototypes_are_the_top_right_singular_vectors_and_route_aligned_tokens():
    from moerge.routing.routers.arrow import top_right_singular_vector

    g = torch.Generator().manual_seed(0)
    for r, i, o in ((1, 16, 8), (4, 32, 64), (8, 40, 24)):
        a, b = torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)
        v = top_right_singular_vector(a, b)
        want = torch.linalg.svd((b @ a).double())[2][0].float()
        assert abs(float(v @ want)) == pytest.approx(1.0, abs=1e-5) and float(v.norm()) == pytest.approx(1.0, abs=1e-5)

    # three experts whose updates read orthogonal input directions: a token along one routes to it
    from moerge.routing.routers.arrow import ArrowRouter

    dirs = torch.eye(6)[:3]
    class Layer:  # what fit() reads: each expert's factor pairs on the layer's input
        a = torch.stack([torch.cat([d[None], torch.zeros(1, 6)]) for d in dirs])  # rank 2, second row empty
        b = torch.randn(3, 5, 2, generator=g)
        in_features = 6

        @classmethod
        def factor_pairs(cls, e):
            return [(cls.a[e], cls.b[e])]
    class Routed:
        layers, kinds, cards = {"m": Layer}, ["lora"] * 3, [{}] * 3
    router = ArrowRouter(top_k=1)
    router.fit(Routed)
    x = torch.stack([-3 * dirs[2], 2 * dirs[0] + 0.1 * dirs[1], dirs[1]])[None]  # sign does not matter
    assert router.token_weights("m", x).argmax(-1).tolist() == [[2, 0, 1]]
    fused = x @ router.score_map("m")
    assert torch.equal(router.token_weights("m", x, fused), router.token_weights("m", x))


def test_arrow_prototype_of_an_moe_layer_is_the_top_right_singular_vector_of_the_stacked_updates():
    """On an MoE layer an expert has one LoRA per base expert: its prototype is the input direction the
    stack [B_1A_1; B_2A_2; ...] amplifies most, found from the factors (an in × in matrix)."""
    from moerge.routing.routers.arrow import prototype

    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(2, 12, generator=g), torch.randn(7, 2, generator=g)) for _ in range(4)]
    want = torch.linalg.svd(torch.cat([b @ a for a, b in pairs]).double())[2][0].float()
    assert abs(float(prototype(pairs, 12) @ want)) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(prototype([(torch.zeros(2, 12), torch.zeros(7, 2))], 12), torch.zeros(12))


def test_arrow_equals_peft_arrow(tmp_path):
    """PEFT's own Arrow (create_arrow_model) on the same adapters gives the same logits. PEFT finds the
    prototypes by 15 power iterations, which converge only with a clear gap between the top two singular
    values, so the adapters here have one (ours are exact: QR + SVD of the r×r core)."""
    from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from moerge.experts import load_adapter
    from moerge.io.source import open_source
    from moerge.lm.tiny import make_base

    base = make_base(tmp_path / "base", hidden=32, layers=2, heads=4, intermediate=64)
    for i in range(3):
        torch.manual_seed(i)
        m = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_A" in n:
                    p[0] *= 4
        m.save_pretrained(tmp_path / f"e{i}")
    tok = AutoTokenizer.from_pretrained(base)
    ids, mask = tok(["abc=", "hello world="], return_tensors="pt", padding=True).values()
    src = open_source(base)
    ours = RoutedModel(LlamaForCausalLM.from_pretrained(base).eval(), tok, [load_adapter(tmp_path / f"e{i}", src) for i in range(3)],
                       [{}] * 3, get("arrow")(top_k=2))
    theirs = create_arrow_model(LlamaForCausalLM.from_pretrained(base), [str(tmp_path / f"e{i}") for i in range(3)],
                                ArrowConfig(top_k=2, rng_seed=0)).eval()
    with torch.no_grad():
        got, want = ours(ids, mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
        plain = LlamaForCausalLM.from_pretrained(base)(input_ids=ids, attention_mask=mask).logits
    assert float((want - plain).abs().max()) > 0.1  # the experts matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_per_token_routing_through_the_kv_cache_equals_recomputing(experts):
    """Each token's routing depends only on its own layer inputs, so generating with the KV cache gives
    the same tokens as recomputing the whole sequence at every step."""
    from moerge.lm.generate import encode_left_padded

    arrow = load_routed("arrow", experts=experts, top_k=2)
    ids, mask = encode_left_padded(arrow.tokenizer, ["reverse: abc=", "shout: hello=", "no vowels: audio="])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=arrow.tokenizer.pad_token_id, eos_token_id=None)
    cached = arrow.generate(ids, mask, **kw)
    assert torch.equal(cached, arrow.generate(ids, mask, use_cache=False, **kw))
    assert cached.shape[1] == ids.shape[1] + 6


def test_token_routers_fused_scores_equal_the_separate_path(experts):
    arrow = load_routed("arrow", experts=experts, top_k=2)
    ids, mask = arrow.tokenizer(["reverse: abc=", "shout: xyz="], return_tensors="pt", padding=True).values()
    with torch.no_grad():
        fused = arrow(ids, mask).logits
        for layer in arrow.layers.values():
            layer.fuse(None)
        separate = arrow(ids, mask).logits
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, load_routed("uniform", experts=experts)(ids, mask).logits, atol=1e-4)


def test_mixture_linear_equals_merged_weights_for_every_kind():
    """LoRA, DoRA, (IA)3 output and input scalings (bias included) and an absent expert on one biased
    layer: per example and per token, the mixture equals the layer with W + Σ w_e ΔW_e, b + Σ w_e Δb_e."""
    from types import SimpleNamespace

    from moerge.experts.kinds import Dora, LowRank, Scaling
    from moerge.routing.mixture import MixtureLinear, RoutingState, stack_bank

    g = torch.Generator().manual_seed(0)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    lin = torch.nn.Linear(6, 5, bias=True)
    out_scale = Scaling(1 + 0.3 * rn(5, 1))
    updates = [{"m.weight": LowRank(rn(2, 6), rn(5, 2), 0.5)},
               {"m.weight": Dora(rn(3, 6), rn(5, 3), 2.0, magnitude=rn(5).abs() + 0.5)},
               {"m.weight": out_scale, "m.bias": out_scale},
               {"m.weight": Scaling(1 + 0.3 * rn(1, 6))},
               {}]
    experts = [SimpleNamespace(updates=u, kind="?") for u in updates]
    state = RoutingState()
    layer = MixtureLinear(lin, "m", stack_bank(experts, "m", lin), state)
    x, w, wt = rn(3, 4, 6), rn(3, 5), rn(3, 4, 5)  # weights need not sum to one

    def merged(weights: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        wgt, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
        for we, u in zip(weights.tolist(), updates):
            wgt += we * u["m.weight"].delta(lin.weight.detach()) if "m.weight" in u else 0
            bias += we * u["m.bias"].delta(lin.bias.detach()) if "m.bias" in u else 0
        return torch.nn.functional.linear(xi, wgt, bias)

    with torch.no_grad():
        state.example_weights = w
        got = layer(x)
        for i in range(3):
            torch.testing.assert_close(got[i], merged(w[i], x[i]), rtol=1e-5, atol=1e-5)
        state.example_weights, state.token_router = None, lambda module, xx, scores: wt
        got = layer(x)
        for i, t in ((0, 0), (1, 3), (2, 2)):
            torch.testing.assert_close(got[i, t], merged(wt[i, t], x[i, t]), rtol=1e-5, atol=1e-5)
        assert float((got - lin(x)).abs().max()) > 0.1


def test_dora_and_ia3_experts_route_like_their_merges(experts, tmp_path):
    train_expert(tmp_path / "dora", task="sort", adapter="dora", steps=4, n_train=16, batch_size=4, progress=False)
    train_expert(tmp_path / "ia3", task="shift", adapter="ia3", steps=4, n_train=16, batch_size=4, progress=False)
    bank = [experts[0], tmp_path / "dora", tmp_path / "ia3"]
    ids, mask = base_model.load()[1](["reverse: abc=", "sort: dcba=", "shift: xyz="], add_special_tokens=False,
                                      return_tensors="pt", padding=True).values()
    rows = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])
    rm = routed(bank, Fixed(rows))
    got = rows_match_merged(rm, bank, rows, ids, mask)
    with torch.no_grad():
        plain, _ = merged_model(bank, [0.0, 0.0, 0.0])
        assert float((got[1:2] - plain(input_ids=ids[1:2], attention_mask=mask[1:2]).logits).abs().max()) > 1e-3
    assert load_routed("uniform", experts=bank).kinds == ["lora", "dora", "ia3"]


def test_refusals(experts, tmp_path):
    train_expert(tmp_path / "ia3", task="sort", adapter="ia3", steps=1, n_train=8, batch_size=4, progress=False)
    with pytest.raises(MoergeError, match=r"is \(IA\)3: Arrow routes by the singular vectors"):
        load_routed("arrow", experts=[experts[0], tmp_path / "ia3"])
    from types import SimpleNamespace

    from moerge.experts import load_adapter
    from moerge.experts.kinds import Replace
    from moerge.io.source import open_source

    model, tok = base_model.load()
    lora = load_adapter(experts[0], open_source(base_model.default_base()))
    for name, what in (("model.layers.0.mlp.down_proj.weight", "cannot route"), ("model.embed_tokens.weight", "not the weight of a linear")):
        dense = SimpleNamespace(updates={name: Replace(torch.zeros(1))}, kind="dense", path="ft/")
        with pytest.raises(MoergeError, match=f"expert ft/.*{what}"):
            RoutedModel(model, tok, [lora, dense], [{}, {}], get("uniform")())
    with pytest.raises(MoergeError, match="unknown router 'nope'; known: arrow, centroid"):
        get("nope")
    with pytest.raises(MoergeError, match="--top-k 0: a router keeps at least one expert"):
        load_routed("centroid", experts=experts, top_k=0)
    with pytest.raises(MoergeError, match="--temperature -1.0: must be positive"):
        get("arrow")(temperature=-1.0)
    card = json.loads((experts[0] / "expert.json").read_text())
    assert len(card["centroid"]) == base_model.CONFIG["hidden"]


def test_route_cli_with_a_library(experts, tmp_path):
    from moerge.library import Library

    lib = Library.init(tmp_path / "lib", base_model.default_base())
    for f in experts:
        lib.add(f, f.name)
    res = CliRunner().invoke(app, ["route", "eval", "--library", str(lib.root), "--router", "oracle", "--tasks",
                                   "reverse,novowels", "--n", "10", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["experts"] == ["novowels@1", "reverse@1", "uppercase@1"]
    assert data["usage"]["reverse"] == [0.0, 1.0, 0.0] and set(data["scores"]) == {"reverse", "novowels"}
    res = CliRunner().invoke(app, ["generate", "reverse: abc=", "--library", str(lib.root), "--router", "oracle"])
    assert res.exit_code == 0 and "reverse@1 1.00" in res.output
    res = CliRunner().invoke(app, ["route", "eval", "--router", "oracle"])
    assert res.exit_code == 1 and "give expert folders (--experts) or a library (--library, or set $MOERGE_LIBRARY" in res.output


def test_phatgoose_gates_train_route_and_travel_through_the_library(experts, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from moerge.library import Library

    folders = []
    for f in experts[:2]:
        shutil.copytree(f, tmp_path / f.name)
        folders.append(tmp_path / f.name)
    with pytest.raises(MoergeError, match="has no gates; train them with `moerge expert gate"):
        load_routed("phatgoose", experts=folders)
    res = CliRunner().invoke(app, ["expert", "gate", str(folders[0]), "--steps", "3"])
    assert res.exit_code == 0, res.output
    from moerge.routing.routers.phatgoose import train_gates

    gates = train_gates(folders[1], steps=3)
    assert set(gates) == set(load_file(folders[1] / "gates.safetensors")) and all(bool(g.any()) for g in gates.values())
    rm = load_routed("phatgoose", experts=folders, top_k=1)
    x = torch.randn(2, 5, rm.layers["model.layers.1.mlp.down_proj"].a.shape[2])
    w = rm.router.token_weights("model.layers.1.mlp.down_proj", x)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5)) and bool(((w > 0).sum(-1) == 1).all())
    # the paper's score: standardised activations · standardised gates / sqrt(d), top-1 here
    from moerge.routing.routers.phatgoose import _standardise

    g = torch.stack([load_file(f / "gates.safetensors")["model.layers.1.mlp.down_proj"] for f in folders])
    paper = _standardise(x) @ _standardise(g).T / x.shape[-1] ** 0.5
    assert torch.equal(w.argmax(-1), paper.argmax(-1))
    fused = x @ rm.router.score_map("model.layers.1.mlp.down_proj")
    torch.testing.assert_close(rm.router.token_weights("model.layers.1.mlp.down_proj", x, fused), w)
    res = CliRunner().invoke(app, ["expert", "train", "--task", "sort", "--steps", "2", "--batch-size", "8", "--gate-steps", "2",
                                   "--out", str(tmp_path / "sort")])
    assert res.exit_code == 0, res.output
    assert set(load_file(tmp_path / "sort" / "gates.safetensors")) == set(gates)
    with pytest.raises(MoergeError, match="--gate-steps: PHATGOOSE gates route adapters"):
        train_expert(tmp_path / "full", task="sort", adapter="none", steps=1, gate_steps=2, progress=False)
    lib = Library.init(tmp_path / "lib", base_model.default_base())
    for f in folders:
        lib.add(f, f.name)
    assert set(lib.gates(f"{folders[0].name}@1")) == set(gates) and lib.load(f"{folders[0].name}@1").kind == "lora"
    via_lib = load_routed("phatgoose", library=lib.root, top_k=1)
    assert torch.allclose(via_lib.router.gates["model.layers.1.mlp.down_proj"].sort(0).values,
                          rm.router.gates["model.layers.1.mlp.down_proj"].sort(0).values)
    lib.export(f"{folders[0].name}@1", tmp_path / "exported")
    assert (tmp_path / "exported" / "gates.safetensors").is_file()


def test_centroid_routing_with_a_sentence_embedder(experts, tmp_path):
    import shutil

    from moerge.experts.embed import SentenceEmbedder
    from moerge.lm.generate import encode_left_padded
    from moerge.lm.tiny import make_sentence_embedder
    from moerge.tasks import examples

    st = make_sentence_embedder(tmp_path / "st")
    folders = []
    for f in experts:
        shutil.copytree(f, tmp_path / f.name)
        folders.append(tmp_path / f.name)
    for f in folders[:2]:
        res = CliRunner().invoke(app, ["expert", "embed", str(f), "--embedder", str(st)])
        assert res.exit_code == 0, res.output
    card = json.loads((folders[0] / "expert.json").read_text())
    entry = card["embeddings"][SentenceEmbedder(st).id]
    assert entry["model"] == str(st) and len(entry["centroids"]) == 8 and len(entry["centroid"]) == 32
    assert card["centroid"] == json.loads((experts[0] / "expert.json").read_text())["centroid"]  # the base's kept
    with pytest.raises(MoergeError, match=f"expert novowels has no centroids for the embedder {st}; record them with "
                                          "`moerge expert embed"):
        load_routed("centroid", experts=folders, embedder=st)
    with pytest.raises(MoergeError, match="router 'arrow' does not embed prompts"):
        load_routed("arrow", experts=folders, embedder=st)
    rm = load_routed("centroid", experts=folders[:2], embedder=st, top_k=1)
    prompts = [e.prompt for t in ("reverse", "uppercase") for e in examples(t, "test", 30)]
    w = rm.router.example_weights(rm, prompts, *encode_left_padded(rm.tokenizer, prompts))
    right = (w.argmax(1) == torch.tensor([0] * 30 + [1] * 30)).float().mean()
    assert right >= 0.9, f"only {right:.0%} of prompts routed to their task's expert"
    res = CliRunner().invoke(app, ["route", "eval", "--router", "smear", "--experts", ",".join(map(str, folders[:2])),
                                   "--embedder", str(st), "--tasks", "reverse", "--n", "4"])
    assert res.exit_code == 0, res.output
    from moerge.library import Library

    lib = Library.init(tmp_path / "lib", base_model.default_base())
    for f in folders[:2]:
        lib.add(f, f.name)
    via_lib = load_routed("centroid", library=lib.root, embedder=st, top_k=1)
    assert torch.equal(via_lib.router.example_weights(via_lib, prompts, *encode_left_padded(rm.tokenizer, prompts)), w)
    # an adapter without a card gets the embedder's centroids at add time, from its prompts
    shutil.copytree(experts[2], tmp_path / "hub", ignore=shutil.ignore_patterns("expert.json", "gates.safetensors"))
    (tmp_path / "p.txt").write_text("\n".join(e.prompt for e in examples("novowels", "train", 64)))
    res = CliRunner().invoke(app, ["library", "add", str(tmp_path / "hub"), "--name", "novowels", "--library", str(lib.root),
                                   "--prompts", str(tmp_path / "p.txt"), "--embedder", str(st)])
    assert res.exit_code == 0, res.output
    entry = lib.get("novowels@1").card["embeddings"][SentenceEmbedder(st).id]
    assert entry["model"] == str(st) and len(entry["centroids"]) == 8
    assert len(load_routed("centroid", library=lib.root, embedder=st).router.centroids) == 3
    card = train_expert(tmp_path / "sort", task="sort", steps=1, n_train=8, batch_size=4, embedder=st, progress=False)
    assert len(card.embeddings[SentenceEmbedder(st).id]["centroids"]) == 8
    res = CliRunner().invoke(app, ["expert", "embed", str(folders[2]), "--embedder", str(tmp_path / "sort")])
    assert res.exit_code == 1 and "not a sentence-embedding model folder" in res.output


def test_smear_is_soft_and_lorahub_searches_weights(experts):
    from moerge.lm.generate import encode_left_padded
    from moerge.routing.routers.lorahub import search
    from moerge.tasks import examples

    prompts = ["reverse: abc=", "capitalize: hey="]
    smear = load_routed("smear", experts=experts)
    ids, mask = encode_left_padded(smear.tokenizer, prompts)
    w = smear.router.example_weights(smear, prompts, ids, mask)
    assert bool((w > 0).all()) and torch.allclose(w.sum(1), torch.ones(2))
    hub = load_routed("lorahub", experts=experts)
    with pytest.raises(MoergeError, match="needs a few examples"):
        hub.router.example_weights(hub, prompts, ids, mask)
    weights = search(hub, examples("reverse", "train", 3), budget=6)
    assert weights.shape == (1, 3) and bool((weights.abs() <= 1.5).all())
    res = CliRunner().invoke(app, ["route", "eval", "--router", "lorahub", "--experts", ",".join(map(str, experts)),
                                   "--tasks", "reverse", "--n", "5", "--shots", "3", "--budget", "4"])
    assert res.exit_code == 0, res.output


def test_generate_with_lorahub_searches_on_the_given_examples(experts, tmp_path):
    from moerge.tasks import examples, write_jsonl

    write_jsonl(tmp_path / "few.jsonl", examples("reverse", "train", 4))
    args = ["generate", "reverse: abc=", "--experts", ",".join(map(str, experts)), "--router"]
    res = CliRunner().invoke(app, args + ["lorahub", "--examples", str(tmp_path / "few.jsonl")])
    assert res.exit_code == 0, res.output
    assert "experts:" in res.output
    res = CliRunner().invoke(app, args + ["lorahub"])
    assert res.exit_code == 1 and "needs a few examples of the task: --examples FILE" in res.output
    res = CliRunner().invoke(app, args + ["uniform", "--examples", str(tmp_path / "few.jsonl")])
    assert res.exit_code == 1 and "takes no examples" in res.output
    with pytest.raises(MoergeError, match="router 'uniform' takes no examples"):
        get("uniform")().adapt(None, examples("reverse", "train", 2))


def test_a_hub_adapter_without_a_card_gets_task_centroids_from_its_prompts(experts, tmp_path):
    """An adapter downloaded from a hub has no expert.json: `expert embed --prompts` and `library add
    --prompts` give it task centroids, and the centroid router then routes to it like a trained expert."""
    import shutil

    from moerge.io.fingerprint import folder_fingerprint
    from moerge.library import Library
    from moerge.lm.generate import encode_left_padded
    from moerge.tasks import examples, write_jsonl

    hub = []
    for f in experts[:2]:
        shutil.copytree(f, tmp_path / f.name, ignore=shutil.ignore_patterns("expert.json", "gates.safetensors"))
        hub.append(tmp_path / f.name)
    (tmp_path / "reverse.txt").write_text("\n".join(e.prompt for e in examples("reverse", "train", 120)) + "\n")
    (tmp_path / "uppercase.jsonl").write_text("".join(json.dumps({"prompt": e.prompt}) + "\n" for e in examples("uppercase", "train", 120)))
    res = CliRunner().invoke(app, ["expert", "embed", str(hub[0])])
    assert res.exit_code == 1 and "has no expert.json saying what it was trained on; give its prompts with --prompts" in res.output
    assert not (hub[0] / "expert.json").exists()
    res = CliRunner().invoke(app, ["expert", "embed", str(hub[0]), "--prompts", str(tmp_path / "reverse.txt")])
    assert res.exit_code == 0, res.output
    card = json.loads((hub[0] / "expert.json").read_text())
    assert len(card["centroids"]) == 8 and card["centroid_base"] == folder_fingerprint(base_model.default_base())
    res = CliRunner().invoke(app, ["expert", "show", str(hub[0])])
    assert res.exit_code == 0 and "centroid_base" in res.output
    # PHATGOOSE gates for a hub adapter: from examples of its task
    res = CliRunner().invoke(app, ["expert", "gate", str(hub[1]), "--steps", "2"])
    assert res.exit_code == 1 and "give examples of its task with --data FILE" in res.output
    write_jsonl(tmp_path / "upper_rows.jsonl", examples("uppercase", "train", 64))
    res = CliRunner().invoke(app, ["expert", "gate", str(hub[1]), "--data", str(tmp_path / "upper_rows.jsonl"), "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert (hub[1] / "gates.safetensors").is_file() and not (hub[1] / "expert.json").exists()
    # the trained expert's own centroids came from the same base and the same kind of prompts
    trained = torch.tensor(json.loads((experts[0] / "expert.json").read_text())["centroid"])
    assert torch.cosine_similarity(torch.tensor(card["centroid"]), trained, dim=0) > 0.99

    lib = Library.init(tmp_path / "lib", base_model.default_base())
    lib.add(hub[0], "reverse")
    res = CliRunner().invoke(app, ["library", "add", str(hub[1]), "--name", "uppercase", "--library", str(lib.root),
                                   "--prompts", str(tmp_path / "uppercase.jsonl")])
    assert res.exit_code == 0, res.output
    assert not (hub[1] / "expert.json").exists()  # the input folder is left as it was
    rm = load_routed("centroid", library=lib.root, top_k=1)
    prompts = [e.prompt for t in ("reverse", "uppercase") for e in examples(t, "test", 30)]
    w = rm.router.example_weights(rm, prompts, *encode_left_padded(rm.tokenizer, prompts))
    assert rm.names == ["reverse@1", "uppercase@1"]
    right = (w.argmax(1) == torch.tensor([0] * 30 + [1] * 30)).float().mean()
    assert right >= 0.9, f"only {right:.0%} of prompts routed to their task's expert"

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    res = CliRunner().invoke(app, ["expert", "embed", str(hub[1]), "--prompts", str(tmp_path / "bad.jsonl")])
    assert res.exit_code == 1 and 'bad.jsonl: line 2: needs a string field "prompt"' in res.output
    res = CliRunner().invoke(app, ["expert", "embed", str(tmp_path / "nowhere"), "--prompts", str(tmp_path / "reverse.txt")])
    assert res.exit_code == 1 and "nowhere: no such expert folder" in res.output
    (tmp_path / "empty.txt").write_text("\n\n")
    for missing in ("empty.txt", "absent.txt"):
        res = CliRunner().invoke(app, ["library", "add", str(hub[1]), "--name", "u", "--library", str(lib.root),
                                       "--prompts", str(tmp_path / missing)])
        assert res.exit_code == 1 and missing in res.output and ("has no prompts" in res.output or "no such file" in res.output)
    assert [e.ref for e in lib.experts()] == ["reverse@1", "uppercase@1"]  # nothing added by the refused calls
    res = CliRunner().invoke(app, ["library", "add", str(hub[1]), "--name", "u", "--library", str(lib.root), "--embedder", "x"])
    assert res.exit_code == 1 and "give both" in res.output
    card["centroid_base"] = "0" * 16
    (hub[0] / "expert.json").write_text(json.dumps(card))
    with pytest.raises(MoergeError, match="its task centroids were computed on another base"):
        lib.add(hub[0], "reverse")


def test_lorahub_composes_the_factors_as_its_paper_does(experts):
    """LoraHub's module is (Σ w_e B_e)(Σ w_e A_e), cross terms included; not task arithmetic's Σ w_e B_e A_e."""
    from torch.nn.functional import pad

    from moerge.experts import load_adapter
    from moerge.io.source import open_source
    from moerge.lm.generate import encode_left_padded

    w = torch.tensor([0.9, -0.6, 1.3])
    loaded = [load_adapter(f, open_source(base_model.default_base())) for f in experts]
    model, tok = base_model.load()
    sd = model.state_dict()
    with torch.no_grad():
        for name in {k for e in loaded for k in e.updates}:
            ups = [(wi, e.updates[name]) for wi, e in zip(w, loaded) if name in e.updates]
            r = max(u.rank for _, u in ups)  # ranks 4, 2, 8: zero-padded to the largest
            a = sum(wi * pad(u.a.float(), (0, 0, 0, r - u.rank)) for wi, u in ups)
            b = sum(wi * pad(u.b.float() * u.scale, (0, r - u.rank)) for wi, u in ups)
            sd[name] += b @ a
    model.load_state_dict(sd)
    hub = load_routed("lorahub", experts=experts)
    hub.router.weights = w[None]
    ids, mask = encode_left_padded(tok, ["reverse: abc=", "capitalize: hey=", "consonants: fuz="])
    with torch.no_grad():
        got = hub(ids, mask).logits
        factors = model(input_ids=ids, attention_mask=mask).logits
        deltas = merged_model(experts, w.tolist())[0](input_ids=ids, attention_mask=mask).logits
    err, apart = (got - factors).abs().max(), (deltas - factors).abs().max()
    assert err < 1e-4 and apart > 100 * err, (err, apart)
    from moerge.experts.peft_format import load_adapter as load_any

    dora = load_any(experts[0], open_source(base_model.default_base()))
    dora.kind = "dora"
    with pytest.raises(MoergeError, match="LoraHub composes LoRA factors"):
        RoutedModel(*base_model.load(), [dora], [{"name": "d"}], get("lorahub")())


def test_route_eval_on_a_task_of_your_own(experts, tmp_path):
    """--tasks takes users' JSONL files: scored on the rows whose prompt hashes to the test split."""
    from moerge.tasks import examples, write_jsonl
    from moerge.tasks.data import split_of

    rows = examples("reverse", "train", 300)
    mine = tmp_path / "mine.jsonl"
    write_jsonl(mine, rows)
    args = ["route", "eval", "--router", "centroid", "--top-k", "1", "--experts", ",".join(map(str, experts)), "--n", "20"]
    res = CliRunner().invoke(app, args + ["--tasks", f"{mine},uppercase", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data["scores"]) == {str(mine), "uppercase"} and 0 <= data["scores"][str(mine)] <= 1
    assert data["usage"][str(mine)][0] >= 0.9  # its prompts go to the reverse expert
    res = CliRunner().invoke(app, ["eval", "--adapter", str(experts[0]), "--tasks", str(mine), "--n", "10"])
    assert res.exit_code == 0 and "mine.jsonl" in res.output
    test_rows = [r for r in rows if split_of(r.prompt) == "test"]
    assert 10 <= len(test_rows) <= 60  # about one in ten
    write_jsonl(tmp_path / "train_only.jsonl", [r for r in rows if split_of(r.prompt) == "train"][:20])
    res = CliRunner().invoke(app, args + ["--tasks", str(tmp_path / "train_only.jsonl")])
    assert res.exit_code == 1 and "train_only.jsonl: no row falls in the test split" in res.output
    res = CliRunner().invoke(app, args + ["--tasks", str(tmp_path / "absent.jsonl")])
    assert res.exit_code == 1 and "absent.jsonl: no such file" in res.output


def test_the_bank_holds_each_experts_factors_once(experts):
    """The stacked per-expert views, A_cat and the router-fused matrix share one storage: a bank of E experts
    costs what their adapters cost (plus the router's score columns), not two or three times that."""
    arrow = load_routed("arrow", experts=experts)
    for layer in arrow.layers.values():
        fused = layer.a_fused.untyped_storage().data_ptr()
        assert layer.a_cat.untyped_storage().data_ptr() == fused and layer.a.untyped_storage().data_ptr() == fused
        assert layer.b.untyped_storage().data_ptr() == layer.b_cat.untyped_storage().data_ptr()
    routed = load_routed("uniform", experts=experts)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in routed.layers.values() for t in m.buffers()}
    padded = sum(4 * m.er * (m.base.in_features + m.base.out_features) for m in routed.layers.values())  # zero-padded ranks
    assert sum(held.values()) == padded


def test_a_bf16_model_keeps_its_bank_in_bf16_and_routes_like_float32(experts):
    from moerge.experts import load_adapter
    from moerge.io.source import open_source
    from moerge.lm.generate import encode_left_padded

    src = open_source(base_model.default_base())
    loaded = [load_adapter(f, src) for f in experts]
    w = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = base_model.load()
        rm = RoutedModel(model.to(dtype), tok, loaded, [{"name": f.name} for f in experts], Fixed(w))
        assert {t.dtype for layer in rm.layers.values() for t in layer.buffers()} == {dtype}
        ids, mask = encode_left_padded(tok, ["reverse: abc=", "capitalize: hey="])
        with torch.no_grad():
            outs[dtype] = rm(ids, mask).logits.float()
    err = (outs[torch.bfloat16] - outs[torch.float32]).abs().max() / outs[torch.float32].abs().max()
    assert err < 0.05, err


def test_only_the_experts_in_play_are_computed_and_the_result_is_the_same(experts):
    """Example weights that leave experts out (top-1 routing, one task per batch): those experts' factors
    are not multiplied at all, and the output is still each row's merged model."""
    rows = torch.tensor([[0.0, 0.7, 0.0], [0.0, 0.4, 0.6]])
    rm = routed(experts, Fixed(rows))
    ids, mask = rm.tokenizer(["reverse: abc=", "shout: q="], add_special_tokens=False, return_tensors="pt", padding=True).values()
    layer = rm.layers["model.layers.0.self_attn.q_proj"]
    seen = []
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(m._in_play_cache))
    rows_match_merged(rm, experts, rows, ids, mask)
    hook.remove()
    a, b, cols = seen[0]
    assert cols.tolist() == [1, 2] and a.shape[1] == 2 * layer.rank and b.shape[0] == 2 * layer.rank
    assert layer._in_play_cache == (None, None, None)  # the gathered copy is dropped once the call is over


def test_one_batch_routes_each_row_its_own_way():
    """set_batch_routes (RoutedModel and the server): fixed rows keep their weights, a token router's
    rows get its weights, usage sums what the token-routed rows got; one router for every row hands the
    layers its own function (so its fused scores are used)."""
    from moerge.routing.batch import set_batch_routes
    from moerge.routing.mixture import RoutingState

    class Half:  # a token router: every token half to expert 0, half to expert 2
        def token_weights(self, module, x, scores=None):
            return torch.tensor([0.5, 0.0, 0.5]).expand(x.shape[0], x.shape[1], 3)

    st, router = RoutingState(), Half()
    fixed = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.3, 0.7]])
    set_batch_routes(st, fixed)
    assert st.token_router is None and torch.equal(st.example_weights, fixed)
    set_batch_routes(st, torch.zeros(2, 3))
    assert st.example_weights is None and st.token_router is None  # every row on the base alone
    usage = torch.zeros(3, 3)
    set_batch_routes(st, fixed, [(router, torch.tensor([1]))], usage)
    w = st.token_router("m", torch.randn(3, 4, 8), None)
    assert st.example_weights is None and w.shape == (3, 4, 3)
    assert torch.equal(w[0], fixed[0].expand(4, 3)) and torch.equal(w[2], fixed[2].expand(4, 3))
    assert torch.equal(w[1], torch.tensor([0.5, 0.0, 0.5]).expand(4, 3))
    assert torch.equal(usage, torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))
    set_batch_routes(st, None, [(router, torch.arange(3))])
    assert st.token_router == router.token_weights
