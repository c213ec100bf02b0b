"""The lm-evaluation-harness bridge, on local task YAMLs over JSONL files (lm-eval reads them offline)."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.errors import MoergeError

pytest.importorskip("lm_eval")
runner = CliRunner()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gen_task(tmp_path, task: str, n: int = 40, name: str | None = None):
    """A generate_until task over ``n`` test rows of a built-in skill, scored by exact match."""
    from moerge.tasks import examples

    rows = examples(task, "test", n, 0)
    data = _jsonl(tmp_path / f"{task}.jsonl", [{"prompt": r.prompt, "completion": r.completion} for r in rows])
    yml = tmp_path / f"{task}.yaml"
    yml.write_text(f"task: {name or 'my_' + task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                   "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{completion}}'\n"
                   "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 16\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n")
    return yml, rows


@pytest.fixture(scope="module")
def base():
    from moerge.lm import base as base_model

    return base_model.load(None)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    from moerge.train.expert import train_expert

    root = tmp_path_factory.mktemp("lm_eval_experts")
    for task in ("reverse", "sort"):
        train_expert(root / task, task=task, steps=6, n_train=96, batch_size=16, progress=False)
    return root


def test_generation_matches_moerges_own_exact_match(base, tmp_path):
    from moerge.eval import evaluate, harness
    from moerge.lm.generate import exact_match, greedy

    model, tok = base
    yml, rows = gen_task(tmp_path, "copy")
    res = harness.run(model, tok, str(yml), log_samples=True)
    own = exact_match(model, tok, rows)
    assert 0 < own < 1  # the built-in base copies most strings, not all: a comparison that can fail
    assert res.primary["my_copy"] == pytest.approx(own) and res.metric["my_copy"] == "exact_match,none"
    assert res.n["my_copy"] == len(rows)
    by_prompt = {s["doc"]["prompt"]: s["filtered_resps"][0] for s in res.samples["my_copy"]}
    assert [by_prompt[r.prompt] for r in rows] == greedy(model, tok, [r.prompt for r in rows])  # bos + text, as moerge
    # beside moerge's own tasks, keyed as written, limited to n examples
    scores = evaluate(model, tok, f"copy,lm-eval:{yml}", n=20)
    assert scores[f"lm-eval:{yml}"] == pytest.approx(exact_match(model, tok, rows[:20]))
    with pytest.raises(MoergeError, match="split their YAML names"):
        evaluate(model, tok, f"lm-eval:{yml}", n=5, split="validation")


def test_multiple_choice_is_the_log_likelihood_argmax(base, tmp_path):
    """lm-eval's loglikelihood requests, checked against log-probabilities computed here."""
    from moerge.eval import harness
    from moerge.tasks import examples

    model, tok = base
    rows = examples("reverse", "test", 30, 1)
    docs = []
    for i, r in enumerate(rows):
        word = r.prompt.split(": ", 1)[1].rstrip("=")
        choices = [r.completion, word] if i % 2 else [word, r.completion]
        docs.append({"prompt": r.prompt, "choices": choices, "label": 1 - i % 2})
    data = _jsonl(tmp_path / "mc.jsonl", docs)
    yml = tmp_path / "mc.yaml"
    yml.write_text(f"task: my_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
                   "output_type: multiple_choice\ndoc_to_text: '{{prompt}}'\ndoc_to_choice: '{{choices}}'\n"
                   "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")

    def logp(prompt: str, answer: str) -> float:
        ctx = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        ids = ctx + tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        return sum(lp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))

    want = sum(max(range(2), key=lambda c: logp(d["prompt"], d["choices"][c])) == d["label"] for d in docs) / len(docs)
    res = harness.run(model, tok, str(yml))
    assert res.primary["my_mc"] == pytest.approx(want)
    assert "acc_norm,none" in res.results["my_mc"] or "acc,none" in res.results["my_mc"]


def test_adapter_and_routed_models(base, experts, tmp_path):
    """A base + adapter and a routed model are what lm-eval drives: its completions are theirs."""
    from moerge.eval import harness
    from moerge.lm.generate import greedy
    from moerge.routing import load_routed
    from moerge.train.expert import load_expert

    model, tok = base
    yml, rows = gen_task(tmp_path, "reverse", n=24)
    prompts = [r.prompt for r in rows]

    def completions(m, t):
        res = harness.run(m, t, str(yml), log_samples=True)
        got = {s["doc"]["prompt"]: s["filtered_resps"][0] for s in res.samples["my_reverse"]}
        return [got[p] for p in prompts]

    base_out = completions(model, tok)
    peft, ptok = load_expert(None, experts / "reverse")
    assert completions(peft, ptok) == greedy(peft, ptok, prompts)
    routed = load_routed("oracle", experts=[experts / "sort", experts / "reverse"])
    routed_out = completions(routed, routed.tokenizer)
    assert routed_out == greedy(routed, routed.tokenizer, prompts) == greedy(peft, ptok, prompts)
    assert routed_out != base_out  # the router applied the reverse expert inside lm-eval's generate


def test_cli_and_merge_report(experts, tmp_path):
    yml, _ = gen_task(tmp_path, "copy", n=20)
    r = runner.invoke(app, ["eval", "--lm-eval", str(yml), "--limit", "10", "--json", str(tmp_path / "res" / "x.json")])
    assert r.exit_code == 0, r.output
    assert "my_copy" in r.output and "exact_match" in r.output
    saved = json.loads((tmp_path / "res" / "x.json").read_text())["lm_eval"]
    assert saved["n"]["my_copy"] == 10 and 0 <= saved["primary"]["my_copy"] <= 1
    r = runner.invoke(app, ["route", "eval", "--router", "oracle", "--experts", f"{experts / 'sort'},{experts / 'reverse'}",
                            "--lm-eval", str(yml), "--limit", "5"])
    assert r.exit_code == 0, r.output
    assert "router oracle" in r.output and "my_copy" in r.output
    from moerge.lm.base import default_base

    base = default_base()
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{experts / n}", "parameters": {"weight": 0.5}}
                                                   for n in ("reverse", "sort")]}
    res = moerge.merge(recipe, tmp_path / "out", eval_tasks=f"lm-eval:{yml}", eval_n=8)
    key = f"lm-eval:{yml}"
    assert res.report.tasks == [key] and all(key in m["scores"] for m in res.report.inputs)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "lm-eval's first metric" in card and json.loads((tmp_path / "out" / "merge_report.json").read_text())["tasks"] == [key]


def test_bad_lm_eval_input_is_one_line(tmp_path):
    bad_data = tmp_path / "bad.yaml"
    bad_data.write_text(f"task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'nope.jsonl'}\n"
                        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: 'x'\n")
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    good, _ = gen_task(tmp_path, "copy", n=4)
    text = good.read_text()

    def variant(name, old, new):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text.replace("task: my_copy", f"task: my_{name}").replace(old, new))
        return str(path)

    broken = [(variant("badfield", "{{completion}}", "{{answer}}"), "my_badfield cannot render its first example"),
              (variant("nodoc", "doc_to_text: '{{prompt}}'\n", ""), "doc_to_text"),
              (variant("nodataset", "dataset_path: json\n", ""), "task my_nodataset has no dataset_path"),
              (variant("badmetric", "metric: exact_match", "metric: exact_mtch"), "unknown metric exact_mtch (close: exact_match"),
              (variant("syntax", "until: ['\\n']", "until: ['\\n'"), "line 1")]
    for yml, needle in broken:
        r = runner.invoke(app, ["eval", "--lm-eval", f"{yml},{good}", "--limit", "2"])
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output
        assert "my_copy" not in lines[0]  # the good task is not blamed
    r = runner.invoke(app, ["eval", "--tasks", "copy,lm-eval:", "--n", "2"])
    assert r.exit_code == 1 and "names no lm-eval task" in r.output
    # a merge scored on a task whose data is missing is refused before anything is merged
    from moerge.lm.base import default_base

    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {default_base()}\n  - model: {default_base()}\n")
    r = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "m"), "--eval", f"lm-eval:{bad_data}", "--eval-n", "2"])
    assert r.exit_code == 1 and "nope.jsonl" in r.output and not (tmp_path / "m").exists(), r.output
    cases = [(["eval", "--lm-eval", str(tmp_path / "missing.yaml")], "no such lm-eval task file"),
             (["eval", "--lm-eval", str(tmp_path / "notask.yaml")], "defines no lm-eval task"),
             (["eval", "--lm-eval", str(bad_data), "--limit", "2"], "nope.jsonl"),
             (["eval", "--tasks", f"lm-eval:{tmp_path / 'missing.yaml'}"], "no such lm-eval task file")]
    for args, needle in cases[1:]:
        r = runner.invoke(app, args)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", *cases[0][0]], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and cases[0][1] in lines[0], proc.stderr
