"""Every PEFT adapter kind, applied by moerge tensor by tensor, equals PEFT's own merge_and_unload."""

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.errors import MoergeError
from moerge.experts import load_adapter
from moerge.io.source import open_source


def _configs():
    from peft import IA3Config, LoraConfig

    return {
        "lora-rslora-alpha-pattern": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_lora_weights=False, use_rslora=True, alpha_pattern={"down_proj": 16}),
        "lora-embeddings-modules-to-save": LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                                      init_lora_weights=False, modules_to_save=["lm_head"]),
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False, use_dora=True),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
    }


@pytest.mark.parametrize("kind", ["lora-rslora-alpha-pattern", "lora-embeddings-modules-to-save", "dora", "ia3"])
def test_adapter_applied_by_moerge_equals_peft_merge(kind, tiny, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    peft_model = get_peft_model(model, _configs()[kind])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))  # make DoRA's magnitude and the saved module differ from the base
    peft_model.save_pretrained(tmp_path / "adapter")
    want = peft_model.merge_and_unload().state_dict()
    r = {"merge_method": "passthrough", "models": [{"model": f"{tiny['base']}+{tmp_path / 'adapter'}"}]}
    out = load_file(moerge.merge(r, tmp_path / "m", progress=False).out_dir / "model.safetensors")
    base = load_file(tiny["base"] / "model.safetensors")
    changed = [k for k in out if not torch.equal(out[k], base[k])]
    for k, v in out.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert changed, "the adapter changed nothing"
    expert = load_adapter(tmp_path / "adapter", open_source(tiny["base"]))
    assert expert.kind == kind.split("-")[0]
    assert set(changed) <= set(expert.updates)


def test_adapter_for_another_base_is_refused(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moerge.lm.tiny import make_base

    other = make_base(tmp_path / "other", hidden=48, layers=3, intermediate=64)
    get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    with pytest.raises(MoergeError, match=r"has shape \(48, 48\) but the base tensor is \(32, 32\) in .*; was it made for another base"):
        load_adapter(tmp_path / "a", open_source(tiny["base"]))
