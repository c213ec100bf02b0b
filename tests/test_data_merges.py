"""Data-aware merges: Fisher-weighted averaging and RegMean, with their statistics step (engine/stats.py)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.errors import MoergeError
from moerge.methods.fisher import fisher
from moerge.methods.regmean import regmean
from moerge.tasks import examples, write_jsonl

runner = CliRunner()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------- the math, pure
@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(2, 6), n_out=st.integers(1, 5), models=st.integers(1, 4), seed=st.integers(0, 1000))
def test_regmean_is_the_least_squares_merge(n_in, n_out, models, seed):
    """With alpha 1 and no ridge, RegMean's weight is the one least-squares problem over every model's
    inputs and outputs: min_W Σ ||X_i W^T - X_i W_i^T||² (nn.Linear's (out, in) layout and Conv1D's)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3 * n_in, n_in, generator=g, dtype=torch.float64) for _ in range(models)]
    ws = [torch.randn(n_out, n_in, generator=g, dtype=torch.float64) for _ in range(models)]
    got = regmean(None, [w.clone() for w in ws], [1.0] * models, [x.T @ x for x in xs], alpha=1.0, ridge=0.0)
    want = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    assert torch.allclose(got, want, atol=1e-8)
    got_t = regmean(None, [w.T.clone() for w in ws], [1.0] * models, [x.T @ x for x in xs], alpha=1.0, ridge=0.0,
                    layout="in_out")
    assert torch.allclose(got_t, want.T, atol=1e-8)


def test_regmean_special_cases():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    same = [x.T @ x] * 2
    # the same inputs for both models: the output that matches both best is their average
    assert torch.allclose(regmean(None, [w.clone() for w in ws], [1.0, 1.0], same, alpha=1.0, ridge=0.0), (ws[0] + ws[1]) / 2)
    # alpha 0 with diagonal-only Grams: per input feature, the average weighted by each model's feature energy
    d = [torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)), torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))]
    got = regmean(None, [w.clone() for w in ws], [1.0, 1.0], d, alpha=0.0, ridge=0.0)
    e = torch.tensor([[1.0, 4.0, 9.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(got, (ws[0] * e[0] + ws[1] * e[1]) / e.sum(0))
    # a 1-d tensor (a norm) or a tensor without statistics: the weighted average
    v = [torch.ones(3), 3 * torch.ones(3)]
    assert torch.allclose(regmean(None, v, [1.0, 3.0], [None, None]), torch.full((3,), 2.5))
    # an input direction no model's data reached stays at the average (the ridge), not at 0
    zero = [torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))] * 2
    got = regmean(None, [w.clone() for w in ws], [1.0, 1.0], zero, alpha=1.0, ridge=1e-6)
    assert torch.allclose(got[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2, atol=1e-9)
    with pytest.raises(MoergeError, match="weights sum to 0"):
        regmean(None, [w.clone() for w in ws], [0.0, 0.0], same)


def test_fisher_weighs_each_entry_by_each_model():
    a, b = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([4.0, 4.0, 4.0])
    fa, fb = torch.tensor([1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    got = fisher(None, [a.clone(), b.clone()], [1.0, 1.0], [fa, fb], [1.0, 1.0], floor=0.0, normalize_fisher=False)
    assert got[:2].tolist() == [2.0, 1.0]  # equal Fisher: the mean; 3:1 toward a: a quarter of the way to b
    assert torch.isnan(got[2])  # 0/0 without a floor ...
    got = fisher(None, [a.clone(), b.clone()], [1.0, 1.0], [fa, fb], [1.0, 1.0], floor=1e-6, normalize_fisher=False)
    assert got[2] == 2.0  # ... the floor falls back to the average
    # normalisation: model b's Fisher is 100x larger overall; divided by its mean, it no longer outvotes a
    got = fisher(None, [a.clone(), b.clone()], [1.0, 1.0], [fa, 100 * fa], [1.0, 100.0], normalize_fisher=True)
    assert torch.allclose(got[:2], torch.tensor([2.0, 2.0]))
    # weights multiply the Fisher
    got = fisher(None, [a.clone(), b.clone()], [3.0, 1.0], [fb, fb], [1.0, 1.0], normalize_fisher=False)
    assert torch.allclose(got[:2], torch.tensor([1.0, 1.0]))


# ------------------------------------------------------------------------------- end to end
def _recipe(method, tiny, data=("reverse", "uppercase"), **shared):
    models = [{"model": str(tiny[f"ft{i + 1}"]), "parameters": {"data": d} if d else {}} for i, d in enumerate(data)]
    return {"merge_method": method, "models": models, "parameters": {"num_examples": 12, **shared}, "dtype": "float32"}


def _layer_inputs(folder, module: str, rows):
    """The inputs of one linear layer over every non-padding token of ``rows`` (the test's own hook)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.lm.batching import collate, encode

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    seen = []
    h = model.get_submodule(module).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    batch = collate(encode(tok, rows), tok.pad_token_id)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])[batch["attention_mask"].reshape(-1).bool()].double()


def test_regmean_merge_solves_each_layer_on_the_models_data(tiny, tmp_path):
    out = tmp_path / "rm"
    moerge.merge(_recipe("regmean", tiny, alpha=1.0, ridge=0.0), out)
    merged = load_file(out / "model.safetensors")
    for name in ("model.layers.1.mlp.down_proj", "model.layers.2.self_attn.v_proj"):  # v shares q's input (one Gram)
        xs = [_layer_inputs(tiny[f"ft{i}"], name, examples(task, "train", 12)) for i, task in ((1, "reverse"), (2, "uppercase"))]
        ws = [load_file(tiny[f"ft{i}"] / "model.safetensors")[f"{name}.weight"].double() for i in (1, 2)]
        xs_n = [x / len(x) ** 0.5 for x in xs]  # Gram matrices are per-token means: each model counts the same
        want = torch.linalg.lstsq(torch.cat(xs_n), torch.cat([x @ w.T for x, w in zip(xs_n, ws)])).solution.T
        assert torch.allclose(merged[f"{name}.weight"].double(), want, atol=5e-6, rtol=0), name
        avg = (ws[0] + ws[1]) / 2
        assert not torch.allclose(merged[f"{name}.weight"].double(), avg, atol=1e-4)  # not merely the average
    norm = "model.layers.1.post_attention_layernorm.weight"
    ns = [load_file(tiny[f"ft{i}"] / "model.safetensors")[norm] for i in (1, 2)]
    assert torch.allclose(merged[norm], (ns[0] + ns[1]) / 2)  # not a linear weight: averaged
    # the tied head/embedding is averaged, not solved for
    emb = "model.embed_tokens.weight"
    es = [load_file(tiny[f"ft{i}"] / "model.safetensors")[emb] for i in (1, 2)]
    assert torch.allclose(merged[emb], (es[0] + es[1]) / 2)


def _whole_model_grams(folder, rows):
    """The test's own Gram matrices: every linear (or Conv1D) layer's inputs over the whole model's
    forward, per-token means over non-padding tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    from moerge.lm.batching import collate, encode

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    batch = collate(encode(tok, rows), tok.pad_token_id)
    keep = batch["attention_mask"].reshape(-1).bool()
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen.update({name: a[0].detach()})))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    out = {}
    for name, x in seen.items():
        flat = x.reshape(-1, x.shape[-1])[keep].double()
        out[f"{name}.weight"] = flat.T @ flat / len(flat)
    return out


@pytest.mark.parametrize("arch", ["llama-untied", "llama-tied", "gpt2"])
def test_gram_is_computed_layer_by_layer(arch, tmp_path, monkeypatch):
    """Every Gram matrix the layer-by-layer pass writes equals the whole model's (an untied head
    included, GPT-2's Conv1D too), and no two decoder layers hold weights at once."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from moerge.engine import layerwise, stats
    from moerge.engine.plan import open_model
    from moerge.lm.tiny import CHARS, SPECIALS, make_base, save_char_tokenizer

    if arch == "gpt2":
        torch.manual_seed(0)
        folder = tmp_path / "gpt2"
        cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=len(SPECIALS) + len(CHARS), n_positions=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        save_char_tokenizer(folder)
    else:
        folder = make_base(tmp_path / arch, seed=3, hidden=32, layers=3, intermediate=64, tie=arch == "llama-tied")
    loaded_at_once = []
    run = layerwise.LayerwiseModel.run

    def watching(self, batches, visit=None, tail=False):
        def spy(prefix, module, b):
            loaded_at_once.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in self.layers))
            visit(prefix, module, b)
        return run(self, batches, spy, tail)

    monkeypatch.setattr(layerwise.LayerwiseModel, "run", watching)
    rows = examples("reverse", "train", 20)  # three batches of 8
    got = stats.compute(open_model(str(folder)), "gram", rows, "reverse")
    want = _whole_model_grams(folder, rows)
    for name, g in want.items():
        if name == "lm_head.weight" and arch != "llama-untied":  # GPT-2 ties its head too
            assert got.get(name) is None  # a tied head is averaged with the embedding, not solved for
            continue
        assert got.get(name) is not None, name
        assert torch.allclose(got.get(name).double(), g, atol=1e-5, rtol=1e-4), name
    assert (got.get("lm_head.weight") is not None) == (arch == "llama-untied")
    if arch != "gpt2":  # q, k and v read the same tensor: one matrix, stored once
        assert got.aliases["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert loaded_at_once and max(loaded_at_once) == 1


def test_fisher_merge_uses_each_models_fisher_and_the_cache(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.lm.batching import collate, completion_loss, encode

    name = "model.layers.0.self_attn.q_proj.weight"
    fishers = []
    for i, task in ((1, "reverse"), (2, "uppercase")):
        model = AutoModelForCausalLM.from_pretrained(tiny[f"ft{i}"], dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tiny[f"ft{i}"])
        p = dict(model.named_parameters())[name]
        acc = torch.zeros_like(p)
        rows = examples(task, "train", 12)
        for ids in encode(tok, rows):  # per example: the squared gradient of its summed token log-likelihood
            batch = collate([ids], tok.pad_token_id)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1]
            labels = batch["labels"][0, 1:]
            keep = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            (g,) = torch.autograd.grad(nll, p)
            acc += g * g
        fishers.append(acc / len(rows))
        assert torch.allclose(completion_loss(model, batch), model(**batch).loss)
    ws = [load_file(tiny[f"ft{i}"] / "model.safetensors")[name] for i in (1, 2)]
    out = tmp_path / "fi"
    moerge.merge(_recipe("fisher", tiny, normalize_fisher=False, floor=0.0), out, progress=True)
    first = capsys.readouterr().err
    assert first.count("statistics: fisher of") == 2 and "cached (" not in first
    want = (fishers[0] * ws[0] + fishers[1] * ws[1]) / (fishers[0] + fishers[1])
    got = load_file(out / "model.safetensors")[name]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, (ws[0] + ws[1]) / 2, atol=1e-5)
    # the same models and data again (another weight): both statistics come from the cache
    recipe = _recipe("fisher", tiny, normalize_fisher=False, floor=0.0)
    recipe["models"][0]["parameters"]["weight"] = 2.0
    moerge.merge(recipe, tmp_path / "fi2", progress=True)
    assert capsys.readouterr().err.count(": cached (") == 2
    # other data for one model: its statistics are computed again, the other's reused
    moerge.merge(_recipe("fisher", tiny, data=("reverse", "sort")), tmp_path / "fi3", progress=True)
    err = capsys.readouterr().err
    assert err.count(": cached (") == 1 and "examples of sort:" in err
    # a damaged cache file is recomputed, not trusted
    from moerge.engine.stats import cache_root

    for k, f in enumerate(sorted(cache_root().glob("fisher-*.safetensors"))):  # garbage, or truncated
        f.write_bytes(b"garbage" if k % 2 else f.read_bytes()[:-100])
    moerge.merge(_recipe("fisher", tiny, normalize_fisher=False, floor=0.0), tmp_path / "fi4", progress=True)
    assert ": cached (" not in capsys.readouterr().err
    assert torch.equal(load_file(tmp_path / "fi4" / "model.safetensors")[name], got)


def test_data_comes_from_the_expert_card(tmp_path):
    """A moerge expert (base+adapter) or a library expert needs no data in the recipe: its card names it."""
    from moerge.library import Library
    from moerge.lm.base import default_base
    from moerge.train.expert import train_expert

    experts = tmp_path / "experts"
    for task in ("reverse", "uppercase"):
        train_expert(experts / task, task=task, steps=3, n_train=64, batch_size=16, progress=False)
    base = default_base()
    recipe = {"merge_method": "regmean", "parameters": {"num_examples": 8},
              "models": [{"model": f"{base}+{experts / t}"} for t in ("reverse", "uppercase")]}
    res = moerge.merge(recipe, tmp_path / "m1", progress=False)
    assert res.tensors > 0
    lib = Library.init(tmp_path / "lib", base=base)
    for t in ("reverse", "uppercase"):
        lib.add(experts / t, name=t)
    recipe["models"] = [{"model": f"library://{t}"} for t in ("reverse", "uppercase")]
    moerge.merge(recipe, tmp_path / "m2", library=tmp_path / "lib")
    a, b = load_file(tmp_path / "m1" / "model.safetensors"), load_file(tmp_path / "m2" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the same experts either way: the same merge


def test_data_aware_refusals(tiny, tmp_path):
    # a model with no data and no expert card
    with pytest.raises(MoergeError, match=r"ft2.*needs examples of what this model was tuned on.*parameters: \{data: FILE.jsonl\}"):
        moerge.merge(_recipe("regmean", tiny, data=("reverse", None)), tmp_path / "o")
    with pytest.raises(MoergeError, match="missing.jsonl is not a .jsonl file"):
        moerge.merge(_recipe("fisher", tiny, data=("reverse", str(tmp_path / "missing.jsonl"))), tmp_path / "o")
    with pytest.raises(MoergeError, match="unknown task 'nosuchtask'"):
        moerge.merge(_recipe("fisher", tiny, data=("reverse", "nosuchtask")), tmp_path / "o")
    recipe = _recipe("regmean", tiny)
    recipe["models"][1]["parameters"]["data"] = [{"filter": "mlp", "value": "sort"}, {"value": "uppercase"}]
    with pytest.raises(MoergeError, match="different data for different tensors"):
        moerge.merge(recipe, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # a user's JSONL works, and the CLI refuses in one line
    rows = tmp_path / "mine.jsonl"
    write_jsonl(rows, examples("reverse", "train", 40))
    (tmp_path / "r.yml").write_text(json.dumps(_recipe("regmean", tiny, data=(str(rows), "uppercase"))))
    assert runner.invoke(app, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "ok")]).exit_code == 0
    (tmp_path / "bad.yml").write_text(json.dumps(_recipe("regmean", tiny, data=("reverse", None))))
    r = runner.invoke(app, ["merge", str(tmp_path / "bad.yml"), str(tmp_path / "bad")])
    assert r.exit_code != 0 and "Traceback" not in r.output and "needs examples" in r.output
    (tmp_path / "alpha.yml").write_text(json.dumps(_recipe("regmean", tiny, alpha=1.5)))
    r = runner.invoke(app, ["merge", str(tmp_path / "alpha.yml"), str(tmp_path / "bad")])
    assert r.exit_code != 0 and "alpha" in r.output and "[0, 1]" in r.output


# ------------------------------------------------------------------------------- the merge report
def test_merge_report_scores_the_merge_against_its_inputs(tmp_path):
    """--eval scores the merge and each input on the same prompts, writes the table into the card and
    JSON, and warns where the merge falls below an input on its own task (here: the built-in base on
    copy, the skill it was pretrained on, averaged with a damaged copy of itself)."""
    import json as _json

    from moerge.eval import evaluate
    from moerge.lm import base as base_model
    from moerge.lm.tiny import make_finetune

    base = base_model.default_base()
    noisy = make_finetune(base, tmp_path / "noisy", seed=3, scale=3.0)
    (tmp_path / "noisy" / "moerge_base.json").unlink(missing_ok=True)
    recipe = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1.0}},
                                                   {"model": str(noisy), "parameters": {"weight": 1.0}}]}
    (tmp_path / "r.yml").write_text(json.dumps(recipe))
    r = runner.invoke(app, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out"), "--eval", "copy,reverse", "--eval-n", "20"])
    assert r.exit_code == 0, r.output
    report = _json.loads((tmp_path / "out" / "merge_report.json").read_text())
    model, tok = base_model.load(base)
    assert report["inputs"][0]["scores"] == evaluate(model, tok, ["copy", "reverse"], n=20)  # the same prompts as `eval`
    merged_model, merged_tok = base_model.load(tmp_path / "out")
    assert report["merged"] == evaluate(merged_model, merged_tok, ["copy", "reverse"], n=20)
    assert report["inputs"][0]["own"] == ["copy"] and report["inputs"][0]["scores"]["copy"] > report["merged"]["copy"]
    assert len(report["warnings"]) == 1 and "below" in report["warnings"][0] and "on copy" in report["warnings"][0]
    assert "warning: the merge scores" in r.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evaluation (moerge merge --eval)" in card and "## Recipe" in card and "> warning:" in card
    # an unknown task is refused before anything is merged
    r = runner.invoke(app, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out2"), "--eval", "nosuch"])
    assert r.exit_code != 0 and "unknown task 'nosuch'" in r.output and not (tmp_path / "out2").exists()


def test_merge_report_knows_an_experts_own_task(tmp_path):
    from moerge.lm.base import default_base
    from moerge.train.expert import train_expert

    train_expert(tmp_path / "rev", task="reverse", steps=2, n_train=32, batch_size=8, progress=False)
    base = default_base()
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": f"{base}+{tmp_path / 'rev'}", "parameters": {"weight": 0.5}}]}
    res = moerge.merge(recipe, tmp_path / "out", eval_tasks="copy,reverse", eval_n=5)
    roles = {m["role"]: m for m in res.report.inputs}
    assert roles["input"]["own"] == ["reverse"] and roles["base"]["own"] == []
    assert set(res.report.merged) == {"copy", "reverse"}
