import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama base and three synthetic fine-tunes of it (fp32, safetensors)."""
    from moerge.lm.tiny import make_base, make_finetune

    root = tmp_path_factory.mktemp("tiny")
    base = make_base(root / "base", seed=0, hidden=32, layers=3, intermediate=64)
    return {
        "root": root,
        "base": base,
        **{f"ft{i}": make_finetune(base, root / f"ft{i}", seed=i) for i in (1, 2, 3)},
    }


@pytest.fixture()
def repo(tmp_path):
    """A git repository with moerge's drivers installed and *.safetensors tracked (version-control tests)."""
    import subprocess

    from moerge.vcs.repo import install, track

    r = tmp_path / "repo"
    r.mkdir()
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=r, check=True, capture_output=True)
    install(r)
    track(["*.safetensors"], r)
    return r


@pytest.fixture(scope="session")
def expert(tmp_path_factory):
    """A LoRA expert of the built-in base (3 steps: what matters here is its files, not its skill)."""
    from moerge.train.expert import train_expert

    path = tmp_path_factory.mktemp("hard") / "sort"
    train_expert(path, task="sort", steps=3, n_train=64, batch_size=16, progress=False)
    return path


@pytest.fixture(scope="session")
def other_base(tmp_path_factory):
    """A base with the built-in base's shapes but other weights: only the base check can tell them apart."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moerge.lm import base as base_model

    out = tmp_path_factory.mktemp("other") / "base"
    shutil.copytree(base_model.default_base(), out)
    sd = load_file(out / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def bf16_base(tmp_path_factory):
    """The packaged base saved as a bf16 checkpoint (its config says so, as SmolLM2's does)."""
    from moerge.lm import base as base_model

    model, tok = base_model.load(dtype=torch.float32)
    out = tmp_path_factory.mktemp("bf16") / "base"
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out
