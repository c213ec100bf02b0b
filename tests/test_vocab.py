"""Merges of models whose vocabularies differ: embedding rows aligned by token string (mergekit's
rules), or refused; never averaged by position."""

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.errors import MoergeError
from moerge.lm.tiny import CHARS, SPECIALS, make_vocab_model, token_vector

H = 16
BASE = SPECIALS + CHARS[:30]
# model a: the base's tokens plus two chat markers; model b: two tokens swapped in id and a tool marker
A = BASE + ["<|im_start|>", "<|im_end|>"]
B = BASE[:10] + [BASE[11], BASE[10]] + BASE[12:] + ["<|tool|>"]
SWAPPED = BASE[:20] + [BASE[21], BASE[20]] + BASE[22:]  # the base's tokens, two of them swapped: same shapes
SEEDS = {"base": 0, "a": 10, "b": 20, "swapped": 30}


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {name: make_vocab_model(root / name, toks, seed=SEEDS[name], hidden=H)
            for name, toks in (("base", BASE), ("a", A), ("b", B), ("swapped", SWAPPED))}


def vec(model: str, token: str, head: bool = False) -> torch.Tensor:
    return token_vector(SEEDS[model] + (1 if head else 0), token, H)


def merged(tmp_path, recipe: dict, name="out"):
    from transformers import AutoTokenizer

    res = moerge.merge(recipe, tmp_path / name)
    sd = load_file(res.out_dir / "model.safetensors")
    vocab = AutoTokenizer.from_pretrained(res.out_dir).get_vocab()
    return res.out_dir, sd, vocab


def test_vocabularies_that_differ_are_refused_without_a_tokenizer_setting(vocab_models, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(vocab_models["a"]), "parameters": {"weight": 1.0}},
                                                   {"model": str(vocab_models["b"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(MoergeError, match=r"vocabularies differ \(token .* is id \d+ in .* but .* in .*\).*tokenizer_source: base"):
        moerge.plan(recipe)
    # the same shapes, so merging by position would run: refused all the same
    with pytest.raises(MoergeError, match=f"token '{BASE[20]}' is id 20 in .* but id 21 in"):
        moerge.plan(recipe | {"models": [{"model": str(vocab_models["base"]), "parameters": {"weight": 1.0}},
                                         {"model": str(vocab_models["swapped"]), "parameters": {"weight": 1.0}}]})
    assert not (tmp_path / "out").exists()


def test_tokenizer_source_base_aligns_every_row_by_token(vocab_models, tmp_path):
    from transformers import AutoModelForCausalLM

    # the base is not under models: so, as in mergekit, it joins the linear merge (here with weight 0)
    recipe = {"merge_method": "linear", "base_model": str(vocab_models["base"]), "tokenizer_source": "base",
              "parameters": {"weight": 0.0},
              "models": [{"model": str(vocab_models["a"]), "parameters": {"weight": 1.0}},
                         {"model": str(vocab_models["b"]), "parameters": {"weight": 3.0}}]}
    out, sd, vocab = merged(tmp_path, recipe)
    assert vocab == {t: i for i, t in enumerate(BASE)}
    emb, head = sd["model.embed_tokens.weight"], sd["lm_head.weight"]
    assert emb.shape == (len(BASE), H) and head.shape == (len(BASE), H)
    for tok, i in vocab.items():  # every token: a's row for it and b's row for it, wherever b keeps it
        torch.testing.assert_close(emb[i], (vec("a", tok) + 3 * vec("b", tok)) / 4)
        torch.testing.assert_close(head[i], (vec("a", tok, True) + 3 * vec("b", tok, True)) / 4)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(BASE) and model.get_input_embeddings().weight.shape[0] == len(vocab)


def test_tokenizer_source_union_fills_missing_tokens_by_mergekits_rules(vocab_models, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"merge_method": "task_arithmetic", "base_model": str(vocab_models["base"]), "tokenizer_source": "union",
              "models": [{"model": str(vocab_models["a"]), "parameters": {"weight": 1.0}},
                         {"model": str(vocab_models["b"]), "parameters": {"weight": 1.0}}]}
    out, sd, vocab = merged(tmp_path, recipe)
    assert set(vocab) == set(BASE) | {"<|im_start|>", "<|im_end|>", "<|tool|>"}
    assert all(vocab[t] == i for i, t in enumerate(BASE))  # the base's ids stay; new tokens follow
    emb = sd["model.embed_tokens.weight"]
    assert emb.shape == (len(vocab), H)
    for tok, i in vocab.items():
        if tok in BASE:  # all three have it: base + (a - base) + (b - base)
            want = vec("a", tok) + vec("b", tok) - vec("base", tok)
        elif tok in A:  # only a has it: every input's row is a's, so the task vectors vanish
            want = vec("a", tok)
        else:
            want = vec("b", tok)
        torch.testing.assert_close(emb[i], want, msg=lambda m: f"token {tok!r}: {m}")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(vocab)


def test_tokenizer_source_a_model_and_shared_tokens_missing_from_one_input(vocab_models, tmp_path):
    """Output vocabulary b's: '<|tool|>' only b has; a lacks it and gets b's row; base and a lack it."""
    recipe = {"merge_method": "linear", "tokenizer_source": str(vocab_models["b"]),
              "models": [{"model": str(vocab_models["a"]), "parameters": {"weight": 1.0}},
                         {"model": str(vocab_models["base"]), "parameters": {"weight": 1.0}},
                         {"model": str(vocab_models["b"]), "parameters": {"weight": 2.0}}]}
    _, sd, vocab = merged(tmp_path, recipe)
    assert vocab == {t: i for i, t in enumerate(B)}
    emb = sd["model.embed_tokens.weight"]
    for tok, i in vocab.items():
        want = (vec("a", tok) + vec("base", tok) + 2 * vec("b", tok)) / 4 if tok in BASE else vec("b", tok)
        torch.testing.assert_close(emb[i], want)


def test_tokenizer_block_rules_force_zero_model_token_and_padding(vocab_models, tmp_path):
    a, b, base = (str(vocab_models[k]) for k in ("a", "b", "base"))
    recipe = {"merge_method": "linear", "base_model": base, "parameters": {"weight": 0.0},
              "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                  "<|im_start|>": {"source": {"kind": "zero"}, "force": True},
                  "<|im_end|>": {"source": {"kind": "model_token", "model": b, "token": "</s>"}},
                  "a": {"source": b, "force": True},
                  "<|new|>": {"source": {"kind": "model_token", "model": a, "token_id": 5}}}},
              "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    out, sd, vocab = merged(tmp_path, recipe)
    n = len(vocab)
    assert "<|new|>" in vocab and n == len(BASE) + 4
    emb = sd["model.embed_tokens.weight"]
    assert emb.shape == (-(-n // 8) * 8, H)
    torch.testing.assert_close(emb[vocab["<|im_start|>"]], torch.zeros(H))  # forced for a too
    torch.testing.assert_close(emb[vocab["<|im_end|>"]], (vec("a", "<|im_end|>") + vec("b", "</s>")) / 2)  # a keeps its own
    torch.testing.assert_close(emb[vocab["a"]], vec("b", "a"))  # forced: both inputs take b's row
    torch.testing.assert_close(emb[vocab["<|new|>"]], vec("a", A[5]))
    torch.testing.assert_close(emb[n:], emb[:n].mean(0).expand(emb.shape[0] - n, H))  # padding: the mean row
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).vocab_size == emb.shape[0]


@pytest.mark.parametrize("block, why", [
    ({"source": "union", "tokens": {"x": {"source": {"kind": "zero", "extra": 1}}}}, "tokenizer: tokens.x.source"),
    ({"source": "union", "pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ({"source": "union", "bogus": 1}, "unknown key 'bogus'"),
    ({"source": "union", "tokens": {"x": {"force": "yes"}}}, "force"),
])
def test_bad_tokenizer_blocks_are_one_line(vocab_models, block, why):
    recipe = {"merge_method": "linear", "tokenizer": block,
              "models": [{"model": str(vocab_models["a"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(MoergeError, match=why):
        moerge.plan(recipe)
    with pytest.raises(MoergeError, match="not both"):
        moerge.plan(recipe | {"tokenizer": {"source": "union"}, "tokenizer_source": "base"})


@pytest.mark.parametrize("name, marker", [("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
                                          ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"),
                                          ("mistral", "[INST] be brief\n\nhi [/INST]"),
                                          ("alpaca", "### Instruction:\nhi\n\n### Response:\n"),
                                          ("exaone", "[|user|]hi\n[|assistant|]")])
def test_named_chat_templates_render_their_format(vocab_models, tmp_path, name, marker):
    from transformers import AutoTokenizer

    out = moerge.merge({"merge_method": "linear", "chat_template": name,
                        "models": [{"model": str(vocab_models["base"]), "parameters": {"weight": 1.0}}]}, tmp_path / name).out_dir
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert marker in text


def test_chat_template_auto_takes_the_template_most_inputs_carry(vocab_models, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    from moerge.engine.chat_templates import TEMPLATES

    folders = []
    for i, template in enumerate(["llama3", "chatml", "chatml"]):
        f = tmp_path / f"m{i}"
        shutil.copytree(vocab_models["base"], f)
        cfg = json.loads((f / "tokenizer_config.json").read_text())
        (f / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": TEMPLATES[template]}))
        folders.append(f)
    recipe = {"merge_method": "linear", "chat_template": "auto",
              "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in folders]}
    out = moerge.merge(recipe, tmp_path / "out").out_dir
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATES["chatml"]
