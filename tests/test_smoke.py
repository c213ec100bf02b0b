import torch
from safetensors.torch import load_file

import moerge


def test_task_arithmetic_end_to_end(tiny, tmp_path):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny["base"]),
        "models": [{"model": str(tiny["ft1"]), "parameters": {"weight": 0.7}},
                   {"model": str(tiny["ft2"]), "parameters": {"weight": 0.3}}],
    }
    res = moerge.merge(recipe, tmp_path / "out")
    out = load_file(res.out_dir / "model.safetensors")
    b = load_file(tiny["base"] / "model.safetensors")
    f1 = load_file(tiny["ft1"] / "model.safetensors")
    f2 = load_file(tiny["ft2"] / "model.safetensors")
    assert set(out) == set(b)
    for k in b:
        want = b[k] + 0.7 * (f1[k] - b[k]) + 0.3 * (f2[k] - b[k])
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)
