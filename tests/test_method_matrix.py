"""Every method on every tiny architecture: the edit changes the outputs, `disable_edits()` and `unload()` give the
base outputs back exactly, and a saved edit reloads to the same outputs. Architecture-specific module shapes (OPT
flattens the tokens inside its MLP, GPT-2 uses Conv1D, T5 edits its decoder) are what this matrix guards."""

import pytest
import torch

from hf_knowedit import EditedModel
from hf_knowedit.errors import ArchitectureNotSupportedError

from .helpers import PROBES, REQUEST, TOKENIZER, model_inputs
from .test_device_map import CONFIGS
from .tiny_models import ARCHITECTURES, tiny_model


DECODER_ONLY = {"rome", "memit", "alphaedit"}  # locate-then-edit needs a decoder-only model
pytestmark = pytest.mark.usefixtures("isolated_statistics_cache")


def logits(model) -> torch.Tensor:
    """Logits of the edit prompt and the unrelated probes (methods that route leave only the probes unchanged); T5's
    decoder reads the start token and the edit's target, as when it is scored."""
    prompts = [REQUEST.filled_prompt, *PROBES]
    inputs = model_inputs(model, prompts)
    if model.config.is_encoder_decoder:
        target = TOKENIZER(" " + REQUEST.target_new)["input_ids"]
        inputs["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id, *target]] * len(prompts))
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_method_edits_and_undoes_on_architecture(method, arch, tmp_path):
    model = tiny_model(arch)
    base = logits(model)
    edited = EditedModel(model, TOKENIZER)
    if arch == "t5" and method in DECODER_ONLY:
        with pytest.raises(ArchitectureNotSupportedError):
            edited.add_edits(CONFIGS[method](), [REQUEST])
        assert torch.equal(logits(edited), base)
        return
    torch.manual_seed(0)
    edited.add_edits(CONFIGS[method](), [REQUEST])
    after = logits(edited)
    assert not torch.equal(after, base), f"{method} left {arch}'s outputs unchanged"
    with edited.disable_edits():
        assert torch.equal(logits(edited), base)
    edited.save_pretrained(tmp_path / "edit")
    loaded = EditedModel.from_pretrained(tiny_model(arch), tmp_path / "edit", tokenizer=TOKENIZER)
    torch.testing.assert_close(logits(loaded), after, rtol=1e-4, atol=1e-5)
    assert torch.equal(logits(edited.unload()), base)
