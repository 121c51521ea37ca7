import torch

from ...architectures import linear_shape, weight_as_out_in
from ...deltas import SparseDelta
from ...devices import execution_device, materialized_weight
from ...editor import BaseEditor
from ...errors import EditFailedError
from .attribution import integrated_gradients, neuron_activations, prompt_probe, select_neurons, top_prediction
from .config import KNConfig


class KNEditor(BaseEditor):
    """Knowledge-neuron edits: attribute, select, and rewrite the selected neurons' value vectors.

    The update of each edited layer is a :class:`~hf_knowedit.SparseDelta` over the columns of the MLP output
    projection (`dim=1`) that are knowledge neurons: nothing else changes. `self.stats["kn_neurons"]` lists the
    neurons, `{layer: [index, ...]}`.
    """

    config_class = KNConfig

    def compute_components(self, edited_model, requests):
        config = self.config
        model, tokenizer, layout = edited_model.base_model, edited_model.tokenizer, edited_model.layout
        layers = config.resolve_layers(layout)
        modules = {layer: layout.mlp_out(model, layer) for layer in layers}
        output_embedding = materialized_weight(layout.lm_head(model)).detach().float()
        columns: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in layers}
        all_neurons = []
        for request in requests:
            probe, new_token = prompt_probe(model, tokenizer, request.filled_prompt, request.target_new)
            if request.target_true is not None:
                old_token = prompt_probe(model, tokenizer, request.filled_prompt, request.target_true)[1]
            else:
                old_token = top_prediction(model, probe)
            attributions = []
            for prompt in [request.filled_prompt, *request.rephrase_prompts]:
                prompt_ready = prompt_probe(model, tokenizer, prompt, request.target_new)[0]
                activations = neuron_activations(model, modules, prompt_ready)
                attributions.append({
                    layer: integrated_gradients(model, modules[layer], prompt_ready, activations[layer], old_token,
                                                config.steps)
                    for layer in layers
                })
            neurons = select_neurons(attributions, config.attribution_threshold, config.refinement_share,
                                     config.max_neurons)
            if not neurons:
                raise EditFailedError(
                    f"KN found no neuron with a positive attribution for {request.filled_prompt!r}; nothing was "
                    "changed. Try other layers or a lower attribution_threshold."
                )
            direction = config.edit_strength * (output_embedding[new_token] - output_embedding[old_token])
            for layer, index in neurons:
                if config.mode == "erase":
                    value = -weight_as_out_in(modules[layer])[:, index].detach().float()
                else:
                    value = direction.to(execution_device(modules[layer]))
                columns[layer][index] = columns[layer].get(index, 0) + value
            all_neurons.extend(neurons)
        components = {}
        for layer, by_index in columns.items():
            if not by_index:
                continue
            indices = sorted(by_index)
            values = torch.stack([by_index[i] for i in indices], dim=1)
            components[layout.mlp_out_path(layer)] = SparseDelta(torch.tensor(indices), values,
                                                                 linear_shape(modules[layer]), dim=1)
        self.stats = {
            "kn_neurons": {str(layer): sorted(by_index) for layer, by_index in columns.items() if by_index},
            "kn_num_neurons": len(set(all_neurons)),
        }
        return components
