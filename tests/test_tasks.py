"""The built-in skill suite and the JSONL format."""

import json

import pytest

from moerge.errors import MoergeError
from moerge.tasks import (
    EXPERTS,
    HELDOUT,
    PRETRAIN,
    SKILLS,
    Example,
    examples,
    get,
    read_jsonl,
    split_of,
    write_jsonl,
)
from moerge.tasks.data import SEPARATOR
from moerge.tasks.skills import REAL_EXPERTS, REAL_HELDOUT, TINY


def test_suite_size_and_disjoint_roles():
    basic = [s for s in SKILLS.values() if not s.composite]
    composite = [s for s in SKILLS.values() if s.composite]
    assert len(basic) >= 12 and len(composite) >= 4
    assert not set(PRETRAIN) & set(EXPERTS)
    assert all(SKILLS[h].composite and set(SKILLS[h].parts) <= set(EXPERTS) for h in HELDOUT)
    assert all(len(set(s.instructions)) >= 3 for s in SKILLS.values())


@pytest.mark.parametrize("name", list(TINY))
def test_answers_change_the_input_and_prompts_are_well_formed(name):
    skill = get(name)
    rows = examples(name, "train", 50)
    for r in rows:
        instruction, x = r.prompt[:-1].split(": ", 1)
        assert r.prompt.endswith(SEPARATOR) and instruction in skill.instructions and SEPARATOR not in x
        assert r.completion == skill.solve(x)
        assert r.completion != x or skill.identity
    assert len({r.prompt.split(": ", 1)[0] for r in rows}) >= 2  # paraphrases are used


def test_known_answers():
    solve = {n: s.solve for n, s in SKILLS.items()}
    assert solve["reverse"]("abc") == "cba"
    assert solve["sort"]("cab") == "abc"
    assert solve["dedupe"]("abca") == "abc"
    assert solve["shift"]("azb") == "bac"
    assert solve["swap"]("abcd") == "badc"
    assert solve["interleave"]("ab xy") == "axby"
    assert solve["count"]("banana a") == "3"
    assert solve["add"]("12+30") == "42"
    assert solve["reverse_uppercase"]("abc") == "CBA"
    assert solve["sort_dedupe"]("cbca") == "abc"


@pytest.mark.parametrize("name", ["reverse", "sort", "add", "reverse_uppercase"])
def test_splits_never_share_an_input(name):
    inputs = {split: {r.prompt.split(": ", 1)[1] for r in examples(name, split, 150)} for split in ("train", "validation", "test")}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["validation"]
    assert not inputs["validation"] & inputs["test"]
    assert all(split_of(x[:-1]) == "test" for x in inputs["test"])


def test_examples_are_deterministic_and_seeded():
    assert examples("sort", "test", 20) == examples("sort", "test", 20)
    assert examples("sort", "test", 20, seed=1) != examples("sort", "test", 20)


def test_jsonl_roundtrip_and_errors(tmp_path):
    rows = examples("reverse", "train", 5)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_jsonl(path) == rows
    assert json.loads(path.read_text().splitlines()[0]).keys() == {"prompt", "completion", "task"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(MoergeError, match=r"bad.jsonl: line 3: needs string fields"):
        read_jsonl(bad)
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(MoergeError, match=r"line 2, column [0-9]+: not JSON"):
        read_jsonl(bad)
    with pytest.raises(MoergeError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    assert read_jsonl(write_jsonl(tmp_path / "u.jsonl", [Example("p", "c")])) == [Example("p", "c")]


def test_the_real_model_suite():
    from moerge.eval import resolve_tasks
    from moerge.tasks.real import number_words

    assert len(REAL_EXPERTS) >= 6 and len(REAL_HELDOUT) >= 4 and not set(REAL_EXPERTS) & set(TINY)
    assert resolve_tasks("all") == list(TINY) and resolve_tasks("real") == list(REAL_EXPERTS + REAL_HELDOUT)
    assert all(set(SKILLS[h].parts) <= set(REAL_EXPERTS) for h in REAL_HELDOUT)
    instructions = [i for s in SKILLS.values() for i in s.instructions]
    assert len(instructions) == len(set(instructions))  # a prompt's instruction names its skill (the oracle)
    for name in REAL_EXPERTS + REAL_HELDOUT:
        rows = examples(name, "train", 40)
        assert all(r.completion != r.prompt.split(": ", 1)[1] for r in rows)
        assert all(r.prompt.split(": ", 1)[0] in SKILLS[name].instructions for r in rows)
        assert len({r.prompt.split(": ", 1)[0] for r in rows}) >= 2 and not any(r.prompt.endswith("=") for r in rows)
        test = {r.prompt.split(": ", 1)[1] for r in examples(name, "test", 40)}
        assert not test & {r.prompt.split(": ", 1)[1] for r in rows}
    solve = {n: s.solve for n, s in SKILLS.items()}
    assert solve["reverse_words"]("apple river stone") == "stone river apple"
    assert solve["sort_words"]("river apple stone") == "apple river stone"
    assert solve["caps"]("apple river") == "APPLE RIVER"
    assert solve["acronym"]("portable network graphics") == "PNG"
    assert solve["iso_date"]("March 5, 2021") == "2021-03-05"
    assert solve["sort_words_acronym"]("river apple stone") == "ARS"
    assert solve["reverse_words_caps"]("apple river") == "RIVER APPLE"
    assert [number_words(n) for n in (0, 7, 13, 20, 42, 100, 305, 999)] == [
        "zero", "seven", "thirteen", "twenty", "forty-two", "one hundred", "three hundred five",
        "nine hundred ninety-nine"]
    prompt = examples("caps", "test", 1)[0].prompt
    assert prompt.split(": ", 1)[0] in SKILLS["caps"].instructions


def test_chat_models_get_their_template_and_the_tiny_base_bos(tiny):
    """Prompts reach a chat model through its chat template (generation header included); the tiny
    character base keeps bos + text."""
    from transformers import AutoTokenizer

    from moerge.lm.batching import encode
    from moerge.lm.chat import prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    assert prompt_ids(tok, ["ab"]) == [[tok.bos_token_id] + tok("ab", add_special_tokens=False)["input_ids"]]
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = prompt_ids(tok, ["ab"])[0]
    assert tok.decode(ids) == "<user>ab|<assistant>"
    (full, n_prompt), = encode(tok, [Example("ab", "cd")])
    assert full[:n_prompt] == ids and tok.decode(full[n_prompt:-1]) == "cd" and full[-1] == tok.eos_token_id
    # and back: routers that read a prompt's words get the user message, not the template around it
    from moerge.lm.chat import prompt_texts
    from moerge.lm.generate import encode_left_padded

    prompts = ["sort: cab=", "a longer prompt: x="]
    assert prompt_texts(tok, *encode_left_padded(tok, prompts)) == prompts
    tok.chat_template = None
    assert prompt_texts(tok, *encode_left_padded(tok, prompts)) == prompts


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(MoergeError, match="unknown task 'nope'; known: copy, reverse"):
        examples("nope", "train", 1)
