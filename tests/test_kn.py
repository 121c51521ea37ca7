"""Knowledge Neurons: attribution, selection, and an edit confined to the selected neurons' value vectors."""

import pytest
import torch

from hf_knowedit import EditConfigError, EditedModel, EditRequest, SparseDelta
from hf_knowedit.architectures import resolve_layout, weight_as_out_in
from hf_knowedit.methods.kn import KNConfig
from hf_knowedit.methods.kn.attribution import integrated_gradients, neuron_activations, prompt_probe

from .helpers import TOKENIZER, logits
from .tiny_models import ARCHITECTURES, tiny_model


REQUEST = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome", target_true="Paris",
                      rephrase_prompts=["France's capital city is"])


def nonzero_columns(delta) -> list[int]:
    return torch.nonzero(delta.delta_weight().abs().sum(0)).flatten().tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_delta_touches_only_the_knowledge_neurons(arch):
    model = tiny_model(arch)
    before = logits(model)
    edited = EditedModel(model, TOKENIZER).add_edits(KNConfig(), [REQUEST])
    edit = edited.get_edit()
    neurons = edit.stats["kn_neurons"]
    assert neurons and sum(len(v) for v in neurons.values()) == edit.stats["kn_num_neurons"]
    layout = resolve_layout(model)
    for path, (delta,) in edit.components.items():
        assert isinstance(delta, SparseDelta) and delta.dim == 1
        layer = next(layer for layer in range(layout.num_layers) if layout.mlp_out_path(layer) == path)
        assert nonzero_columns(delta) == neurons[str(layer)] == sorted(delta.indices.tolist())
    assert not torch.equal(logits(edited), before)
    with edited.disable_edits():
        assert torch.equal(logits(edited), before)


def test_erase_zeroes_the_value_vectors():
    model = tiny_model("llama")
    edited = EditedModel(model, TOKENIZER).add_edits(KNConfig(mode="erase", layers=[2], max_neurons=3), [REQUEST])
    (delta,) = edited.get_edit().components["model.layers.2.mlp.down_proj"]
    weight = weight_as_out_in(model.model.layers[2].mlp.down_proj).detach()
    indices = delta.indices
    assert len(indices) <= 3
    torch.testing.assert_close(delta.values, -weight[:, indices])


def test_integrated_gradients_are_complete():
    """The attributions of a layer sum to P(y | activation) − P(y | 0) (Sundararajan et al.'s completeness)."""
    model = tiny_model("gpt2")
    layout = resolve_layout(model)
    module = layout.mlp_out(model, 1)
    probe, token = prompt_probe(model, TOKENIZER, REQUEST.filled_prompt, REQUEST.target_true)
    activation = neuron_activations(model, {1: module}, probe)[1]
    attribution = integrated_gradients(model, module, probe, activation, token, steps=200)

    def scale_at_probe(scale):
        def hook(module, args):
            x = args[0].clone()
            x[:, probe.position] *= scale
            return (x,)

        return hook

    def probability(scale):
        handle = module.register_forward_pre_hook(scale_at_probe(scale))
        try:
            with torch.no_grad():
                return model(**probe.inputs).logits[0, probe.position].softmax(-1)[token]
        finally:
            handle.remove()

    expected = probability(1.0) - probability(0.0)
    assert float(attribution.sum()) == pytest.approx(float(expected), rel=0.05, abs=1e-7)


def test_config_is_checked():
    with pytest.raises(EditConfigError, match="attribution_threshold"):
        KNConfig(attribution_threshold=0)
    with pytest.raises(EditConfigError, match="mode"):
        KNConfig(mode="delete")
