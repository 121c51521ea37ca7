import torch

from ...deltas import DenseDelta
from ...devices import execution_device, input_device
from ...editor import BaseEditor
from ...errors import EditFailedError
from ...tokenization import encode_prompt_target
from ...utils import tqdm
from .config import FTConfig


class FTEditor(BaseEditor):
    """Fine-tunes a dense change `ΔW` of the chosen weights; the base weights themselves are never written.

    The change is a trainable :class:`~hf_knowedit.deltas.DenseDelta` hooked onto each module, so the forward pass
    is the model's own, with the active edits of earlier calls under it.
    """

    config_class = FTConfig

    def target_paths(self, edited_model) -> list[str]:
        layout = edited_model.layout
        paths = []
        for layer in self.config.resolve_layers(layout):
            if self.config.target_module == "mlp_out":
                paths.append(layout.mlp_out_path(layer))
            elif self.config.target_module == "mlp_in":
                paths.extend(layout.mlp_in_paths(layer))
            else:
                paths.append(layout.attn_out_path(layer))
        return paths

    def compute_components(self, edited_model, requests):
        from ...architectures import linear_shape

        config = self.config
        model = edited_model.base_model
        deltas = {}
        for path in self.target_paths(edited_model):
            module = model.get_submodule(path)
            zeros = torch.zeros(linear_shape(module), device=execution_device(module))
            deltas[path] = DenseDelta(zeros, trainable=True)
        # Tokenise everything first: a request too long for the model fails before any optimisation.
        chunks = [requests[i : i + config.batch_size] for i in range(0, len(requests), config.batch_size)]
        batches = [
            encode_prompt_target(edited_model.tokenizer, [r.filled_prompt for r in chunk],
                                 [r.target_new for r in chunk], model=model)
            for chunk in chunks
        ]
        device = input_device(model)
        batches = [b.to(device) for b in batches]
        params = [d.delta for d in deltas.values()]
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        bound = config.norm_constraint if config.norm_constraint and config.norm_constraint > 0 else None
        losses = []
        with edited_model.temporary_components(deltas), torch.enable_grad():
            bar = tqdm(range(config.num_steps), desc="FT edit", leave=False)
            for _ in bar:
                total = 0.0
                for batch in batches:
                    optimizer.zero_grad(set_to_none=True)
                    logits = edited_model(**batch.model_inputs()).logits
                    loss = self.loss(batch, logits)
                    if not torch.isfinite(loss):
                        raise EditFailedError(
                            f"The FT loss became {loss.item()} at step {len(losses) + 1}; nothing was changed. Lower "
                            f"FTConfig.lr (now {config.lr}) or set a norm_constraint."
                        )
                    loss.backward()
                    optimizer.step()
                    if bound is not None:
                        with torch.no_grad():
                            for p in params:
                                p.clamp_(-bound, bound)
                    total += loss.item() * batch.input_ids.shape[0]
                losses.append(total / len(requests))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if losses[-1] < config.stop_loss:
                    break
        self.stats = {"ft_steps": len(losses), "ft_final_loss": losses[-1], "ft_initial_loss": losses[0]}
        return {path: delta.frozen() for path, delta in deltas.items()}

    def loss(self, batch, logits: torch.Tensor) -> torch.Tensor:
        """Mean over requests of the target's negative log-likelihood under the configured objective."""
        if self.config.objective == "target_tokens":
            return -batch.target_log_probs(logits).mean()
        positions = torch.tensor([0 if batch.is_encoder_decoder else n - 1 for n in batch.prompt_lengths],
                                 device=logits.device)
        last = logits[torch.arange(logits.shape[0], device=logits.device), positions].float().log_softmax(-1)
        mask = batch.labels != -100
        token_logp = last.unsqueeze(1).expand(-1, batch.labels.shape[1], -1)
        token_logp = token_logp.gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -((token_logp * mask).sum(-1) / mask.sum(-1)).mean()
