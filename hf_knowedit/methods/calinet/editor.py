import torch

from ...devices import input_device
from ...editor import BaseEditor
from ...errors import EditFailedError
from ...tokenization import encode_prompt_target
from ...utils import tqdm
from .config import CaliNETConfig
from .side_ffn import SideFFN, ffn_host_path, hidden_size


class CaliNETEditor(BaseEditor):
    """Trains calibration slots beside the FFN of the chosen blocks on the requests' target likelihood.

    >>> from hf_knowedit import get_edited_model, EditRequest
    >>> from hf_knowedit.methods.calinet import CaliNETConfig
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> request = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
    >>> edited = get_edited_model(tiny_model("gpt2"), CaliNETConfig(num_steps=2), [request], tokenizer=tiny_tokenizer())
    >>> sorted(edited.get_edit().components)
    ['transformer.h.3.mlp']
    """

    config_class = CaliNETConfig

    def compute_components(self, edited_model, requests):
        config = self.config
        model = edited_model.base_model
        layout = edited_model.layout
        device = input_device(model)
        hidden = hidden_size(model)
        generator = torch.Generator().manual_seed(0)  # a fixed initialisation: the same edit gives the same slots
        slots = {}
        for layer in config.resolve_layers(layout):
            keys = torch.randn(config.num_slots, hidden, generator=generator) * config.init_scale / hidden**0.5
            slots[ffn_host_path(layout, layer)] = SideFFN(
                keys, torch.zeros(config.num_slots), torch.zeros(config.num_slots, hidden), config.activation,
                trainable=True,
            ).to(device)
        batch = encode_prompt_target(edited_model.tokenizer, [r.filled_prompt for r in requests],
                                     [r.target_new for r in requests], model=model).to(device)
        passes = [part for _, part in batch.row_chunks(config.requests_per_pass)]  # keeping the batch's padding
        params = [p for s in slots.values() for p in s.parameters()]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        losses = []
        with edited_model.temporary_components(slots), torch.enable_grad():
            for _ in tqdm(range(config.num_steps), desc="CaliNET edit", leave=False):
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for part in passes:
                    # the mean over all requests, as the sum of each pass's mean weighted by its share of them (a
                    # weight of exactly 1.0 for a batch in one pass, whose step is then computed as without passes)
                    weight = part.input_ids.shape[0] / len(requests)
                    loss = -part.target_log_probs(edited_model(**part.model_inputs()).logits).mean() * weight
                    if not torch.isfinite(loss):
                        raise EditFailedError(f"The CaliNET loss became {loss.item()}; lower CaliNETConfig.lr.")
                    step_loss += loss.item()
                    loss.backward()
                losses.append(step_loss)
                if losses[-1] < config.stop_loss:
                    break
                optimizer.step()
        self.stats = {"calinet_steps": len(losses), "calinet_initial_loss": losses[0], "calinet_final_loss": losses[-1],
                      "calinet_passes_per_step": len(passes)}
        return {path: s.frozen() for path, s in slots.items()}
