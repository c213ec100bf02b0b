"""Where models compute (``--device``, ``$MOERGE_DEVICE``; issue 31). This machine has no GPU: the
CUDA paths are checked for what they choose and refuse; bench/device_check.py is the GPU run."""

import pytest
import torch
from typer.testing import CliRunner

from moerge.cli import app
from moerge.errors import MoergeError
from moerge.lm import device, precision

runner = CliRunner()
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


@no_cuda
def test_the_device_a_name_means_and_the_ones_this_machine_lacks(monkeypatch):
    monkeypatch.delenv(device.ENV, raising=False)
    assert device.resolve("cpu") == torch.device("cpu")
    assert device.resolve("auto").type in ("cpu", "mps") and device.resolve(None) == device.resolve("auto")
    for bad in ("cuda", "cuda:1"):
        with pytest.raises(MoergeError, match=rf"--device {bad}: torch sees no CUDA device here .*use --device cpu"):
            device.resolve(bad)
    with pytest.raises(MoergeError, match="give auto, cpu, cuda, cuda:N or mps"):
        device.set_device("gpu")
    monkeypatch.setenv(device.ENV, "tpu")
    with pytest.raises(MoergeError, match=r"MOERGE_DEVICE='tpu': give auto"):
        device.resolve()
    monkeypatch.setenv(device.ENV, "cpu")
    assert device.resolve() == torch.device("cpu")


def test_a_gpu_computes_bf16_checkpoints_in_bf16_where_it_can(monkeypatch):
    """``auto`` dtype on a GPU: bf16 for a bf16 checkpoint when the GPU supports it; float32 on MPS and for
    float32 checkpoints; the CPU's eager attention only on the CPU."""
    monkeypatch.delenv(precision.ENV, raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.compute_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert precision.compute_dtype(torch.float32, cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.compute_dtype(torch.bfloat16, cuda) == torch.float32
    assert precision.compute_dtype(torch.bfloat16, torch.device("mps")) == torch.float32
    monkeypatch.setenv(precision.ENV, "float32")
    assert precision.compute_dtype(torch.bfloat16, cuda) == torch.float32
    assert precision.model_kwargs(torch.bfloat16, cuda) == {}
    assert precision.model_kwargs(torch.bfloat16, torch.device("cpu")) == {"attn_implementation": "eager"}


def test_inputs_follow_the_model():
    lin = torch.nn.Linear(2, 2)

    class Routed:  # what RoutedModel looks like to the helpers: the base model under .model
        model = lin

    assert device.model_device(lin) == torch.device("cpu") and device.model_device(Routed()) == torch.device("cpu")
    batch = {"ids": torch.ones(2, 3)}
    moved = device.to_device(batch, torch.device("cpu"))
    assert moved["ids"] is batch["ids"]  # no copy on the CPU


@no_cuda
def test_train_and_eval_take_the_device_option(tmp_path, monkeypatch):
    monkeypatch.setenv(device.ENV, "auto")  # --device sets it for the process; restored after the test
    res = runner.invoke(app, ["eval", "--device", "cuda", "--tasks", "sort"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "torch sees no CUDA device" in lines[0]
    res = runner.invoke(app, ["expert", "train", "--task", "sort", "--steps", "1", "--batch-size", "4", "--device", "cuda",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and not (tmp_path / "x").exists()
    res = runner.invoke(app, ["--device", "cpu", "expert", "train", "--task", "sort", "--steps", "1", "--batch-size", "4",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    a = runner.invoke(app, ["eval", "--device", "cpu", "--adapter", str(tmp_path / "x"), "--tasks", "sort", "--n", "8",
                            "--json", str(tmp_path / "a.json")])
    b = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "x"), "--tasks", "sort", "--n", "8",
                            "--json", str(tmp_path / "b.json")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    import json

    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_the_device_check_runs_the_loop_on_the_cpu():
    """bench/device_check.py, the GPU acceptance run, in its smoke form: train, eval, library, merge,
    route -> serve, one table (on a GPU machine: ``python bench/device_check.py --device cuda``)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "device_check.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| step")]
    assert [ln.split(" | ")[0].lstrip("| ") for ln in rows] == [
        "train sort", "eval sort expert", "train reverse", "eval reverse expert", "library add",
        "merge (task arithmetic)", "eval merge", "route eval centroid", "route eval arrow",
        "serve 4 requests per expert and router"]
    served = rows[-1].split(" | ")
    assert served[-2] == "100.0%", rows[-1]  # a burst answers as each request alone
    r = subprocess.run([sys.executable, str(script), "--device", "cuda" if not __import__("torch").cuda.is_available()
                        else "cuda:99", "--quick"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --device cuda") and "Traceback" not in r.stderr


def test_gradient_checkpointing_trains_the_same_expert(tmp_path, monkeypatch):
    """Recomputing activations in the backward pass changes memory and time, not the gradients: the
    same seed gives the same adapter with and without it (for LoRA on a dense base and on an MoE base)."""
    import transformers.modeling_utils as mu
    from safetensors.torch import load_file

    from moerge.lm.tiny import make_base
    from moerge.train.expert import train_expert

    calls = []
    real = mu.checkpoint
    monkeypatch.setattr(mu, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    for base in (None, make_base(tmp_path / "mixtral", arch="mixtral", hidden=32, intermediate=64)):
        got = []
        for ckpt in (False, True):
            out = tmp_path / f"x-{ckpt}-{base is not None}"
            train_expert(out, base=base, task="sort", steps=3, n_train=32, batch_size=8, n_val=20, progress=False,
                         gradient_checkpointing=ckpt)
            got.append(load_file(out / "adapter_model.safetensors"))
            assert bool(calls) == ckpt  # the layers were checkpointed exactly when asked
            calls.clear()
        assert got[0].keys() == got[1].keys()
        for k in got[0]:
            torch.testing.assert_close(got[0][k], got[1][k], rtol=1e-4, atol=1e-6, msg=k)


@no_cuda
def test_qlora_is_refused_in_one_line_without_cuda(tmp_path):
    r = runner.invoke(app, ["expert", "train", "--task", "sort", "--out", str(tmp_path / "q"), "--quantize", "4bit",
                            "--device", "cpu"])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "--quantize 4bit: bitsandbytes' 4-bit layers need a CUDA GPU; this run is on cpu" in r.output
    r = runner.invoke(app, ["expert", "train", "--task", "sort", "--out", str(tmp_path / "q"), "--quantize", "8bit"])
    assert r.exit_code == 1 and "--quantize '8bit': give 4bit" in r.output
    assert not (tmp_path / "q").exists()


def test_device_map_auto_offloads_a_base_and_answers_as_it_whole(tmp_path, monkeypatch):
    """``--device-map auto`` with less memory than the model: accelerate keeps what fits and offloads
    the rest to disk; evaluation answers exactly as the whole model does, and so does routing (a LoRA and
    a DoRA expert, mixed uniformly and by Arrow), whose layers read their offloaded weights as they run."""
    from moerge.api import evaluate
    from moerge.lm import base as base_model
    from moerge.lm.device import MAP_ENV, MEMORY_ENV, dispatched, offloaded
    from moerge.lm.tiny import make_base
    from moerge.routing import load_routed
    from moerge.train.expert import train_expert

    base = make_base(tmp_path / "b", hidden=64, layers=4)
    train_expert(tmp_path / "x", base=base, task="reverse", steps=2, n_train=16, batch_size=8, n_val=20, progress=False)
    train_expert(tmp_path / "y", base=base, task="sort", adapter="dora", steps=2, n_train=16, batch_size=8, n_val=20,
                 progress=False)
    whole = evaluate(base, tasks="reverse", n=6).scores
    whole_x = evaluate(adapter=tmp_path / "x", tasks="reverse", n=6).scores
    monkeypatch.setenv(MAP_ENV, "auto")
    monkeypatch.setenv(MEMORY_ENV, "cpu=200KB")
    model, _ = base_model.load(base)
    assert offloaded(model) and "disk" in dispatched(model).values()
    assert evaluate(base, tasks="reverse", n=6).scores == whole
    assert evaluate(adapter=tmp_path / "x", tasks="reverse", n=6).scores == whole_x
    # routing and serving adapt the offloaded layers too: the weights copied in once per layer for both terms
    ids = torch.tensor([[1, 40, 41, 42], [1, 50, 51, 52]])
    monkeypatch.delenv(MAP_ENV)
    with torch.no_grad():
        want = {r: load_routed(r, experts=[tmp_path / "x", tmp_path / "y"], base=base)(ids).logits for r in ("uniform", "arrow")}
    monkeypatch.setenv(MAP_ENV, "auto")
    for r in ("uniform", "arrow"):
        routed = load_routed(r, experts=[tmp_path / "x", tmp_path / "y"], base=base)
        assert offloaded(routed.model)
        with torch.no_grad():
            torch.testing.assert_close(routed(ids).logits, want[r], msg=r)
    r = runner.invoke(app, ["--device-map", "auto", "--max-memory", "cpu:lots", "eval", str(base)])
    assert r.exit_code == 1 and "--max-memory 'cpu:lots': give DEVICE=AMOUNT pairs" in r.output


def test_max_memory_and_device_map_refuse_bad_input_before_any_work(tmp_path, monkeypatch):
    from moerge.lm.device import MAP_ENV, MEMORY_ENV

    for env in (MAP_ENV, MEMORY_ENV):  # the options set these for the process: restored after the test
        monkeypatch.setenv(env, "")
    bad = {("--device-map", "auto", "--max-memory", "cpu=lots"): "cpu='lots' is not an amount",
           ("--device-map", "auto", "--max-memory", "cpu=-5GB"): "is not an amount",
           ("--device-map", "auto", "--max-memory", "cpu=1GB,cpu=2GB"): "cpu is named twice",
           ("--max-memory", "cpu=1GB"): "add --device-map auto",
           ("--device-map", "all"): "--device-map 'all': give auto"}
    if not torch.cuda.is_available():
        bad[("--device-map", "auto", "--max-memory", "0=1GiB")] = "there is no GPU 0"
    if not torch.backends.mps.is_available():
        bad[("--device-map", "auto", "--max-memory", "mps=1GB")] = "torch sees no Apple MPS device here"
    for opts, line in bad.items():
        monkeypatch.setenv(MAP_ENV, "")
        r = runner.invoke(app, [*opts, "eval", str(tmp_path)])
        assert r.exit_code == 1 and line in r.output and r.output.count("\n") == 1, (opts, r.output)
    monkeypatch.setenv(MAP_ENV, "")
    for value, line in (("cpu=lots", "is not an amount"), ("cpu=1GB", "$MOERGE_MAX_MEMORY says what --device-map auto")):
        monkeypatch.setenv(MEMORY_ENV, value)  # the variable is checked as the option is
        r = runner.invoke(app, ["eval", str(tmp_path)])
        assert r.exit_code == 1 and line in r.output and r.output.count("\n") == 1, (value, r.output)
    monkeypatch.setenv(MEMORY_ENV, "")
    r = runner.invoke(app, ["--device-map", "auto", "expert", "train", "--task", "sort", "--out", str(tmp_path / "t")])
    assert r.exit_code == 1 and "training needs the model on one device" in r.output and not (tmp_path / "t").exists()
