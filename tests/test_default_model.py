"""End-to-end checks on the embedded default model, SmolLM2-135M-Instruct (slow: the model loads once per module)."""

import hashlib

import pytest
import torch

from hf_knowedit import EditedModel, EditRequest, FTConfig, load_default_model
from hf_knowedit.modeling import CACHE_MARKER, default_model_cache_dir


PROMPT = "The mother tongue of Danielle Darrieux is"
REQUEST = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")


@pytest.fixture(scope="module")
def default_model():
    return load_default_model()


def weight_digests(model) -> dict[str, str]:
    return {name: hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy()).hexdigest()
            for name, t in model.state_dict().items()}


def greedy(model, tokenizer, max_new_tokens: int = 2) -> str:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_load_default_model(default_model):
    model, tokenizer = default_model
    assert model.config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None
    assert (default_model_cache_dir() / CACHE_MARKER).is_file()  # converted once, loaded from the HF cache
    assert greedy(model, tokenizer).startswith(" French")  # what the model knows before the edit


def test_ft_m_edit_changes_the_completion_and_unload_restores(default_model):
    model, tokenizer = default_model
    digests = weight_digests(model)
    edited = EditedModel(model, tokenizer).add_edits(FTConfig(), [REQUEST])
    try:
        first_token = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" English"))[0]
        inputs = tokenizer(PROMPT, return_tensors="pt")
        with torch.no_grad():
            assert edited(**inputs).logits[0, -1].argmax().item() == first_token
        assert greedy(edited, tokenizer).startswith(" English")
        with edited.disable_edits():
            assert greedy(edited, tokenizer).startswith(" French")
    finally:
        base = edited.unload()
    assert base is model
    assert weight_digests(base) == digests
    assert greedy(base, tokenizer).startswith(" French")
