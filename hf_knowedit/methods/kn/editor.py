import torch

from ...architectures import linear_shape, weight_as_out_in
from ...deltas import SparseDelta
from ...devices import execution_device, materialized_weight
from ...editor import BaseEditor
from ...errors import EditFailedError
from ...resumable import edit_work_piece
from .attribution import integrated_gradients, neuron_activations, prompt_probe, select_neurons, top_prediction
from .config import KNConfig


# the config fields the neurons depend on (a resumable edit's pieces are keyed by them, see `hf_knowedit.resumable`);
# `layers_per_pass` is not one of them: it changes how the layers are batched, not their attributions
ATTRIBUTION_FIELDS = ("steps", "attribution_threshold", "refinement_share", "max_neurons")


class KNEditor(BaseEditor):
    """Knowledge-neuron edits: attribute, select, and rewrite the selected neurons' value vectors.

    The update of each edited layer is a :class:`~hf_knowedit.SparseDelta` over the columns of the MLP output
    projection (`dim=1`) that are knowledge neurons: nothing else changes. `self.stats["kn_neurons"]` lists the
    neurons, `{layer: [index, ...]}`.
    """

    config_class = KNConfig

    def compute_components(self, edited_model, requests):
        config = self.config
        model, layout = edited_model.base_model, edited_model.layout
        layers = config.resolve_layers(layout)
        modules = {layer: layout.mlp_out(model, layer) for layer in layers}
        output_embedding = materialized_weight(layout.lm_head(model)).detach().float()
        columns: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in layers}
        all_neurons = []
        settings = {name: getattr(config, name) for name in ATTRIBUTION_FIELDS}
        for request in requests:
            inputs = {"layers": layers, "config": settings, "prompt": request.filled_prompt,
                      "rephrase_prompts": request.rephrase_prompts, "target_new": request.target_new,
                      "target_true": request.target_true}
            piece = edit_work_piece("kn_neurons", edited_model, inputs,
                                    lambda request=request: self.knowledge_neurons(edited_model, modules, request))
            neurons = [tuple(pair) for pair in piece["neurons"].tolist()]
            old_token, new_token = piece["tokens"].tolist()
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

    def knowledge_neurons(self, edited_model, modules: dict, request) -> dict[str, torch.Tensor]:
        """The request's knowledge neurons, `neurons` `(k, 2)` (layer, index), and its target tokens, `tokens`
        (old, new): the neurons whose integrated-gradient attribution to the old token passes the threshold on its
        prompts (Dai et al. 2022, §3)."""
        config, model, tokenizer = self.config, edited_model.base_model, edited_model.tokenizer
        probe, new_token = prompt_probe(model, tokenizer, request.filled_prompt, request.target_new)
        if request.target_true is not None:
            old_token = prompt_probe(model, tokenizer, request.filled_prompt, request.target_true)[1]
        else:
            old_token = top_prediction(model, probe)
        attributions = []
        for prompt in [request.filled_prompt, *request.rephrase_prompts]:
            prompt_ready = prompt_probe(model, tokenizer, prompt, request.target_new)[0]
            activations = neuron_activations(model, modules, prompt_ready)
            attributions.append(integrated_gradients(model, modules, prompt_ready, activations, old_token,
                                                     config.steps, config.layers_per_pass))
        neurons = select_neurons(attributions, config.attribution_threshold, config.refinement_share,
                                 config.max_neurons)
        return {"neurons": torch.tensor(neurons, dtype=torch.long).reshape(-1, 2),
                "tokens": torch.tensor([old_token, new_token])}
