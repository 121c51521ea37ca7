"""Low-rank edits exported as PEFT LoRA adapters load in `peft` and give the edited model's logits."""

import json

import pytest
import torch

from hf_knowedit import EditedModel, EditRequest, FTConfig
from hf_knowedit.errors import EditConfigError
from hf_knowedit.methods.memit import MEMITConfig
from hf_knowedit.methods.rome import ROMEConfig
from hf_knowedit.peft_export import export_peft_lora

from .tiny_models import tiny_model, tiny_tokenizer


peft = pytest.importorskip("peft")

FAST = dict(v_num_grad_steps=3, v_lr=1.0, clamp_norm_factor=1e4, v_weight_decay=0.0, num_context_prefixes=1,
            context_prefix_length=3, mom2_adjustment=False)
REQUESTS = [EditRequest(prompt="The new capital is {}", subject=s, target_new=t)
            for s, t in [("Atlantis", "Paris"), ("Narnia", "London"), ("Gondor", "Rome")]]


def logits(model) -> torch.Tensor:
    batch = tiny_tokenizer()(["The new capital is Atlantis", "Something else entirely"], return_tensors="pt",
                             padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_lora_export_gives_identical_logits(tmp_path, arch, method):
    config = ROMEConfig(**FAST) if method == "rome" else MEMITConfig(**FAST, mom2_update_weight=1.0)
    edited = EditedModel(tiny_model(arch), tiny_tokenizer())
    edited.add_edits(config, REQUESTS[:2])
    edited.add_edits(config, REQUESTS[2:])  # stacked: components of different ranks are concatenated
    expected = logits(edited)
    export_peft_lora(edited, tmp_path)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] == (arch == "gpt2")
    assert set(adapter["rank_pattern"]) == set(edited.get_edit().components)
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert torch.allclose(logits(loaded), expected, atol=1e-5)
    assert not torch.allclose(logits(tiny_model(arch)), expected, atol=1e-5)


def test_dense_edits_are_refused(tmp_path):
    edited = EditedModel(tiny_model("llama"), tiny_tokenizer())
    edited.add_edits(FTConfig(num_steps=1), REQUESTS[:1])
    with pytest.raises(EditConfigError, match="low-rank"):
        export_peft_lora(edited, tmp_path / "out")
    assert not (tmp_path / "out").exists()
