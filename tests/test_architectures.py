"""Structural layout resolution on tiny random models of every supported architecture."""

import functools

import pytest
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from hf_knowedit.architectures import (
    ModelLayout,
    linear_shape,
    register_architecture,
    resolve_layout,
    unregister_architecture,
    weight_as_out_in,
)
from hf_knowedit.errors import ArchitectureNotSupportedError, EditConfigError
from hf_knowedit.tokenization import encode_prompt_target

from .tiny_models import ARCHITECTURES, HIDDEN_SIZE, INTERMEDIATE_SIZE, NUM_LAYERS, tiny_model, tiny_tokenizer


@functools.cache
def cached_model(arch: str):
    """One model per architecture for the read-only tests (hooks are removed after use)."""
    return tiny_model(arch)


def forward(model, arch: str, batch):
    extra = {"decoder_input_ids": batch["input_ids"]} if arch == "t5" else {}
    with torch.no_grad():
        return model(**batch, **extra).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
class TestLayout:
    def test_resolves_blocks(self, arch):
        model = cached_model(arch)
        layout = resolve_layout(model)
        assert isinstance(layout, ModelLayout)
        assert layout.num_layers == NUM_LAYERS
        assert len(layout.blocks(model)) == NUM_LAYERS
        assert layout.is_encoder_decoder == (arch == "t5")
        assert layout.model_type == model.config.model_type
        assert resolve_layout(model) is layout  # cached per instance

    def test_mlp_shapes(self, arch):
        model = cached_model(arch)
        layout = resolve_layout(model)
        for layer in range(layout.num_layers):
            assert linear_shape(layout.mlp_out(model, layer)) == (HIDDEN_SIZE, INTERMEDIATE_SIZE)
            for module in layout.mlp_in(model, layer):
                out_features, in_features = linear_shape(module)
                assert in_features == HIDDEN_SIZE
                assert out_features in (INTERMEDIATE_SIZE, 2 * INTERMEDIATE_SIZE)
        assert len(layout.mlp_in_paths(1)) == len(layout.mlp_in_names) >= 1

    def test_attention_output_shape(self, arch):
        model = cached_model(arch)
        layout = resolve_layout(model)
        assert linear_shape(layout.attn_out(model, 0)) == (HIDDEN_SIZE, HIDDEN_SIZE)
        assert "attn" in layout.attn_out_path(0).lower() or "attention" in layout.attn_out_path(0).lower()

    def test_weights_transposed_only_for_conv1d(self, arch):
        model = cached_model(arch)
        layout = resolve_layout(model)
        assert layout.weights_transposed == (arch == "gpt2")
        module = layout.mlp_out(model, 0)
        assert isinstance(module, Conv1D) == layout.weights_transposed
        weight = weight_as_out_in(module)
        assert tuple(weight.shape) == linear_shape(module)
        assert weight.data_ptr() == module.weight.data_ptr()  # a view, not a copy

    def test_norm_head_and_embedding(self, arch):
        model = cached_model(arch)
        layout = resolve_layout(model)
        norm = layout.module(model, layout.final_norm_path)
        assert "norm" in type(norm).__name__.lower()
        assert layout.final_norm(model) is norm
        assert layout.lm_head(model) is model.get_output_embeddings()
        assert layout.input_embeddings(model) is model.get_input_embeddings()

    def test_mlp_out_hook_fires(self, arch):
        model = cached_model(arch)
        layout = resolve_layout(model)
        seen = []
        handle = layout.mlp_out(model, 1).register_forward_hook(lambda module, args, output: seen.append(output.shape))
        try:
            forward(model, arch, tiny_tokenizer()(["The Eiffel Tower is in"], return_tensors="pt"))
        finally:
            handle.remove()
        assert len(seen) == 1 and seen[0][-1] == HIDDEN_SIZE

    def test_layer_indices(self, arch):
        layout = resolve_layout(cached_model(arch))
        for fraction in (0.0, 0.25, 0.5, 1.0):
            for count in (1, 2, 10):
                layers = layout.default_layers(fraction, count)
                assert layers == list(range(layers[0], layers[0] + len(layers)))
                assert len(layers) == min(count, NUM_LAYERS)
                assert all(0 <= layer < NUM_LAYERS for layer in layers)
        layout.check_layer(0)
        layout.check_layer(NUM_LAYERS - 1)
        for bad in (-1, NUM_LAYERS):
            with pytest.raises(EditConfigError, match=rf"layers={bad}.*0\.\.{NUM_LAYERS - 1}"):
                layout.check_layer(bad)
        with pytest.raises(EditConfigError, match="my_field"):
            layout.check_layer(NUM_LAYERS, "my_field")

    def test_padded_batch_matches_unpadded(self, arch):
        model = cached_model(arch)
        tokenizer = tiny_tokenizer()
        short = "Paris is the capital of"
        padded = forward(
            model,
            arch,
            tokenizer([short, "The Eiffel Tower is located in the city of"], return_tensors="pt", padding=True),
        )
        alone = forward(model, arch, tokenizer([short], return_tensors="pt"))
        length = alone.shape[1]
        torch.testing.assert_close(padded[0, :length], alone[0], rtol=1e-4, atol=1e-4)


def test_default_layers_rule():
    layout = ModelLayout(
        model_type="toy",
        is_encoder_decoder=False,
        blocks_path="layers",
        num_layers=30,
        mlp_in_names=("mlp.up",),
        mlp_out_name="mlp.down",
        attn_out_name="attn.o",
        final_norm_path="norm",
        lm_head_path="head",
        embed_path="embed",
        weights_transposed=False,
    )
    assert layout.default_layers() == [7]
    assert layout.default_layers(1.0, 3) == [27, 28, 29]
    assert layout.mlp_out_path(3) == "layers.3.mlp.down"
    assert layout.mlp_in_paths(3) == ("layers.3.mlp.up",)
    with pytest.raises(EditConfigError):
        layout.default_layers(1.5)
    with pytest.raises(EditConfigError):
        layout.default_layers(0.5, 0)
    with pytest.raises(EditConfigError):
        layout.block_path(30)


def test_linear_shape_conv1d_and_linear():
    assert linear_shape(nn.Linear(8, 4)) == (4, 8)
    assert linear_shape(Conv1D(4, 8)) == (4, 8)
    with pytest.raises(TypeError):
        linear_shape(nn.LayerNorm(4))


def test_tiny_models_are_deterministic():
    first, again, other = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)
    assert not first.training and first.dtype == torch.float32


def test_tiny_tokenizer_is_gpt2():
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


class ToyConfig(PreTrainedConfig):
    model_type = "toy_flat"

    def __init__(self, vocab_size=16, hidden_size=8, num_hidden_layers=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class ToyModel(PreTrainedModel):
    """No block list at all: an embedding straight into a head."""

    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def test_unknown_structure_raises():
    with pytest.raises(ArchitectureNotSupportedError) as info:
        resolve_layout(ToyModel(ToyConfig()))
    message = str(info.value)
    assert "toy_flat" in message and "ToyModel" in message
    assert 'register_architecture("toy_flat", layout_fn)' in message
    assert isinstance(info.value, ValueError)


def test_register_architecture_overrides_detection():
    def toy_layout(model):
        return ModelLayout(
            model_type="toy_flat",
            is_encoder_decoder=False,
            blocks_path="blocks",
            num_layers=model.config.num_hidden_layers,
            mlp_in_names=("up",),
            mlp_out_name="down",
            attn_out_name="attn",
            final_norm_path="norm",
            lm_head_path="head",
            embed_path="embed",
            weights_transposed=False,
        )

    llama = tiny_model("llama")
    detected = resolve_layout(llama)
    register_architecture("toy_flat", toy_layout)
    register_architecture("llama", lambda model: ModelLayout(**{**detected.__dict__, "mlp_in_names": ("mlp.up_proj",)}))
    try:
        assert resolve_layout(ToyModel(ToyConfig())).mlp_out_name == "down"
        assert resolve_layout(llama).mlp_in_names == ("mlp.up_proj",)  # the cache was cleared on registration
    finally:
        unregister_architecture("toy_flat")
        unregister_architecture("llama")
    assert resolve_layout(llama).mlp_in_names == ("mlp.gate_proj", "mlp.up_proj")
    with pytest.raises(TypeError):
        register_architecture("llama", "not callable")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_teacher_forced_inputs_build_no_key_value_cache(arch):
    """PromptTargetBatch.model_inputs() is what every teacher-forced pass of the library runs; it asks for no cache,
    which every architecture accepts."""
    model = cached_model(arch)
    batch = encode_prompt_target(tiny_tokenizer(), ["The sky is", "Paris is in"], [" blue", " France"], model=model)
    with torch.no_grad():
        output = model(**batch.model_inputs())
    assert output.logits.shape[:2] == batch.labels.shape
    assert getattr(output, "past_key_values", None) is None
