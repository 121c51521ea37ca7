import torch

from ...deltas import LowRankDelta
from ...editor import BaseEditor
from ...training import load_editor_for
from ...training.gradient_editor import GradientEditorSpec
from ...training.gradients import (
    edit_and_locality_losses,
    encode,
    layer_gradients,
)
from .config import MENDConfig
from .network import MENDEditorNetwork


class MENDTrainingSpec(GradientEditorSpec):
    """How MEND's editor network is trained (Mitchell et al. 2022, Algorithm 1): the update made from the edit
    prompts' gradient is applied, then `c_edit · NLL(target_new | rephrase) + c_loc · KL(locality)` trains the
    network and the step sizes."""

    config_class = MENDConfig

    def build_trainable(self) -> MENDEditorNetwork:
        shapes = self.edited_shapes()
        return MENDEditorNetwork(shapes, self.config.rank, self.config.num_hidden, self.config.edit_lr)

    def parameter_groups(self, trainable, learning_rate):
        network = [p for name, p in trainable.named_parameters() if name != "edit_lrs"]
        return [
            {"params": network, "lr": learning_rate},
            {"params": [trainable.edit_lrs], "lr": self.config.edit_lr_lr},
        ]

    def update_factors(self, trainable: MENDEditorNetwork, gradients) -> dict:
        """`{path: (up, down)}` of the update MEND makes from the layer gradients of an edit."""
        return {
            path: trainable.update_factors(index, gradients[path].inputs, gradients[path].output_grads)
            for index, path in enumerate(self.edited_module_paths())
        }

    def training_loss(self, trainable, requests):
        return edit_and_locality_losses(
            self.model,
            self.tokenizer,
            requests,
            self.edited_module_paths(),
            lambda batch, gradients, _: self.update_factors(trainable, gradients),
            self.config.c_edit,
            self.config.c_loc,
        )


class MENDEditor(BaseEditor):
    """Edits with a trained MEND network: one forward and backward pass on the edit prompts, then a low-rank update
    `ΔW = -η Σ_t δ̃_t ũ_tᵀ` per edited layer, stored as a :class:`~hf_knowedit.LowRankDelta` of rank at most the
    number of tokens of the edit prompts (with their targets)."""

    config_class = MENDConfig

    def compute_components(self, edited_model, requests):
        model = edited_model.base_model  # its forward runs the active edits' hooks, so earlier edits are seen
        spec, network = load_editor_for(self.config, model, edited_model.tokenizer)
        batch = encode(
            edited_model.tokenizer, model, [r.filled_prompt for r in requests], [r.target_new for r in requests]
        )
        gradients = layer_gradients(model, spec.edited_module_paths(), batch)
        with torch.no_grad():
            factors = spec.update_factors(network, gradients)
        self.stats = {
            "mend_rank": int(next(iter(factors.values()))[0].shape[1]),
            "mend_edit_lrs": network.edit_lrs.detach().tolist(),
            "mend_editor": self.config.editor,
        }
        return {path: LowRankDelta(up, down) for path, (up, down) in factors.items()}
