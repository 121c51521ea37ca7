import torch

from ...devices import input_device
from ...editor import BaseEditor
from ...errors import EditFailedError
from ...locate.resume import ResumedTargetLogProbs
from ...tokenization import encode_prompt_target
from ...utils import tqdm
from ..calinet.side_ffn import hidden_size, key_positions, record_module_io
from .codebook import GraceCodebook, TrainableValue, codebooks_bypassed
from .config import GRACEConfig


class GRACEEditor(BaseEditor):
    """Adds one codebook entry per request: the key read at the prompt's end, the value trained for the target.

    >>> from hf_knowedit import get_edited_model, EditRequest
    >>> from hf_knowedit.methods.grace import GRACEConfig
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> request = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
    >>> edited = get_edited_model(tiny_model("gpt2"), GRACEConfig(num_steps=5), [request], tokenizer=tiny_tokenizer())
    >>> len(edited.get_edit().components["transformer.h.3"][0])
    1
    """

    config_class = GRACEConfig

    def compute_components(self, edited_model, requests):
        config = self.config
        model = edited_model.base_model
        layout = edited_model.layout
        layer = config.resolve_layers(layout)[0]
        path = layout.block_path(layer)
        device = input_device(model)
        codebook = GraceCodebook.empty(hidden_size(model)).to(device)
        actions, losses = [], []
        with codebooks_bypassed(edited_model, path):
            for request in tqdm(requests, desc="GRACE edit", leave=False):
                batch = encode_prompt_target(edited_model.tokenizer, [request.filled_prompt], [request.target_new],
                                             model=model).to(device)
                position = key_positions(batch)[0]
                with torch.no_grad(), record_module_io(model, path) as records:
                    edited_model(**batch.model_inputs())
                key = records["output"][-1][0, position].float()
                value = TrainableValue(key, [position])
                losses.append(self.train_value(edited_model, path, layer, value, batch))
                radius = config.initial_radius * float(key.norm())
                actions.append(codebook.insert(key, value.value.detach(), radius, request.target_new.strip()))
        self.stats = {"grace_actions": actions, "grace_final_loss": max(losses)}
        return {path: codebook}

    def train_value(self, edited_model, path, layer, value: TrainableValue, batch) -> float:
        config = self.config
        optimizer = torch.optim.Adam(value.parameters(), lr=config.lr)
        loss = None
        with edited_model.temporary_components({path: value}), torch.enable_grad():
            target_log_probs = ResumedTargetLogProbs(edited_model, batch, layer)
            for _ in range(config.num_steps):
                optimizer.zero_grad(set_to_none=True)
                loss = -target_log_probs().mean()
                if not torch.isfinite(loss):
                    raise EditFailedError(f"The GRACE value loss became {loss.item()}; lower GRACEConfig.lr.")
                if loss.item() < config.stop_loss:
                    break
                loss.backward()
                optimizer.step()
        return float(loss.item())
