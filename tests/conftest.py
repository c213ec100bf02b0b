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
    from moerge.tiny import make_base, make_finetune

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
