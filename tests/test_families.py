"""Every dense decoder family transformers ships, tried on a tiny random-init model of each (issue 31):
an expert of each adapter kind trains on it, targets the layers its family has (fused projections
too), and moerge applies it exactly as PEFT does: merged into the weights (``merge_and_unload``) and
in the mixture runtime that routing and serving use (the logits of PEFT's merged model)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.lm.arch import ia3_modules
from moerge.lm.tiny import FAMILIES, make_base
from moerge.routing import load_routed
from moerge.train.expert import peft_config, train_expert


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: make_base(root / arch, arch=arch, hidden=32, intermediate=64) for arch in FAMILIES}


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_trains_every_adapter_kind_and_merges_as_peft_does(arch, bases, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = bases[arch]
    for adapter in ("lora", "ia3"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base)
        peft_model = get_peft_model(model, peft_config(adapter, 4, model))
        with torch.no_grad():  # (IA)³ starts at ones and LoRA's B at zeros: make the adapter change something
            for name, p in peft_model.named_parameters():
                if "ia3_l" in name or "lora_B" in name:
                    p.add_(0.1 * torch.randn_like(p))
        peft_model.save_pretrained(tmp_path / adapter)
        # as the checkpoint stores it (transformers renames some tensors on load: GPT-NeoX's embed_out)
        peft_model.merge_and_unload().save_pretrained(tmp_path / f"want-{adapter}")
        want = load_file(tmp_path / f"want-{adapter}" / "model.safetensors")
        r = {"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / adapter}"}]}
        out = load_file(moerge.merge(r, tmp_path / f"m-{adapter}").out_dir / "model.safetensors")
        before = load_file(base / "model.safetensors")
        changed = {k for k in out if not torch.equal(out[k], before[k])}
        for k, v in out.items():
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=f"{arch} {adapter}: {k}")
        # the mixture runtime (routing, serving) applies it as PEFT does: one expert, weight 1
        ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
        routed = load_routed("uniform", experts=[tmp_path / adapter], base=base)
        with torch.no_grad():
            torch.testing.assert_close(routed(ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5,
                                       msg=f"{arch} {adapter}: routed logits")
        routed.detach()
        targets = ia3_modules(model)[0] if adapter == "ia3" else None
        if targets:  # every (IA)³ target of the family is scaled, attention and feed-forward alike
            assert {k.split(".")[-2] for k in changed} == set(targets), (arch, changed)
        assert changed, f"{arch} {adapter}: the adapter changed nothing"
    # `moerge expert train --adapter ia3` on this family: its keys/values and feed-forward layers
    card = train_expert(tmp_path / "x", base=base, task="copy", adapter="ia3", steps=1, n_train=8, batch_size=4,
                        n_val=20, progress=False)
    saved = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == set(ia3_modules(AutoModelForCausalLM.from_pretrained(base))[0])
    assert card.trainable_params > 0


def test_a_family_whose_layers_cannot_be_told_apart_is_one_line():
    from torch import nn

    from moerge.errors import MoergeError

    class Odd(nn.Module):
        config = type("C", (), {"model_type": "odd"})()

        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)

    with pytest.raises(MoergeError, match=r"\(IA\)3 on odd: cannot tell .* its linear layers: mix\); use --adapter lora"):
        ia3_modules(Odd())


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_goes_through_library_routers_fusion_and_git(arch, bases, tmp_path):
    """Two hub-style LoRA adapters of each family: kept in a library, routed by a token router (Arrow,
    prototypes from every layer's factors) and an example router, fused into base@2, and read against a
    committed checkpoint as `git add --lora` reads them."""
    from moerge.experts.peft_format import parse_adapter, read_adapter
    from moerge.fusion import fuse
    from moerge.io.source import open_source
    from moerge.library import Library
    from moerge.lm.tiny import make_random_adapter

    base = bases[arch]
    xs = [make_random_adapter(base, tmp_path / f"x{s}", seed=s) for s in (0, 1)]
    lib = Library.init(tmp_path / "lib", base)
    for i, x in enumerate(xs):
        lib.add(x, f"x{i}", task="sort")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    arrow = load_routed("arrow", library=lib.root)
    arrow.state.record = True
    with torch.no_grad():
        arrow(ids)
    used = sum(arrow.state.usage.values())
    assert used.shape == (2,) and float(used.sum()) > 0
    with torch.no_grad():
        assert torch.isfinite(load_routed("uniform", library=lib.root)(ids).logits).all()
    new = fuse(lib, method="average").base
    assert new.version == 2 and (new.path / "config.json").is_file()
    bare = tmp_path / "committed"  # a checkpoint without its config, as git holds it
    bare.mkdir()
    for f in base.glob("*.safetensors"):
        (bare / f.name).write_bytes(f.read_bytes())
    config, tensors = read_adapter(xs[0])
    assert parse_adapter(config, tensors, open_source(bare)).updates
