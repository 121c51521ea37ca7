import torch

from ...deltas import LowRankDelta
from ...devices import execution_device
from ...editor import BaseEditor
from ...training import load_editor_for
from ...training.gradient_editor import GradientEditorSpec
from ...training.gradients import (
    edit_and_locality_losses,
    encode,
    layer_gradients,
)
from .config import KEConfig
from .network import KEHypernetwork


class KETrainingSpec(GradientEditorSpec):
    """How KE's hypernetwork is trained: the update predicted for each fact of a batch is applied, then
    `c_edit · NLL(target_new | rephrase) + c_loc · KL(locality)` trains the hypernetwork."""

    config_class = KEConfig

    def build_trainable(self) -> KEHypernetwork:
        shapes = self.edited_shapes()
        embedding_size = self.model.get_input_embeddings().weight.shape[1]
        return KEHypernetwork(embedding_size, self.config.condition_size, shapes, self.config.edit_scale)

    def fact_conditions(self, trainable: KEHypernetwork, requests) -> torch.Tensor:
        """The encoding `h` of each request's fact, `(batch, 2 · condition_size)`."""
        texts = [f"{r.filled_prompt} {r.target_new.strip()}" for r in requests]
        ids = [self.tokenizer(text)["input_ids"] for text in texts]
        lengths = torch.tensor([len(i) for i in ids])
        padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for row, token_ids in enumerate(ids):
            padded[row, : len(token_ids)] = torch.tensor(token_ids)
        embedding = self.model.get_input_embeddings()
        with torch.no_grad():
            embeddings = embedding(padded.to(execution_device(embedding))).float()
        return trainable.encoder(embeddings, lengths)

    def update_factors(self, trainable: KEHypernetwork, requests, gradients) -> dict:
        conditions = self.fact_conditions(trainable, requests)
        return {
            path: trainable.update_factors(
                index, conditions, gradients[path].inputs, gradients[path].output_grads, gradients[path].request_index
            )
            for index, path in enumerate(self.edited_module_paths())
        }

    def training_loss(self, trainable, requests):
        return edit_and_locality_losses(
            self.model,
            self.tokenizer,
            requests,
            self.edited_module_paths(),
            lambda batch, gradients, batch_requests: self.update_factors(trainable, batch_requests, gradients),
            self.config.c_edit,
            self.config.c_loc,
        )


class KEEditor(BaseEditor):
    """Edits with a trained KE hypernetwork: the gradient of each fact's NLL, transformed by the heads conditioned on
    the fact, gives a :class:`~hf_knowedit.LowRankDelta` per edited weight (rank: tokens + 1 per request)."""

    config_class = KEConfig

    def compute_components(self, edited_model, requests):
        model = edited_model.base_model
        spec, network = load_editor_for(self.config, model, edited_model.tokenizer)
        batch = encode(
            edited_model.tokenizer, model, [r.filled_prompt for r in requests], [r.target_new for r in requests]
        )
        gradients = layer_gradients(model, spec.edited_module_paths(), batch)
        with torch.no_grad():
            factors = spec.update_factors(network, requests, gradients)
        self.stats = {"ke_rank": int(next(iter(factors.values()))[0].shape[1]), "ke_editor": self.config.editor}
        return {path: LowRankDelta(up, down) for path, (up, down) in factors.items()}
