import functools
import os
import weakref

import torch

from ...data import load_config_records
from ...devices import input_device
from ...editor import BaseEditor
from ...errors import EditFailedError
from ...locate.resume import ResumedTargetLogProbs
from ...tokenization import encode_prompt_target
from ...utils import get_logger, tqdm
from ..calinet.side_ffn import SideFFN, ffn_host_path, key_positions, record_module_io
from .config import TPatcherConfig


logger = get_logger(__name__)

GENERIC_MEMORY_PROMPTS = [
    "The weather today is",
    "A completely unrelated sentence about",
    "She opened the door and saw",
    "The history of the city begins in",
    "In mathematics, a prime number is",
    "My favourite food is",
    "The company was founded by",
    "He was born in the year",
    "The river flows through",
    "The official language of the country is",
    "This book was written by",
    "The game ended with a score of",
]


def memory_file_prompts(path: str, records: int) -> tuple[str, ...]:
    """The edit prompts and locality prompts of the first `records` records of an edit dataset file (read again when
    the file changes on disk)."""
    try:
        stat = os.stat(path)
    except OSError:  # load_config_records says what is wrong with the path
        return _memory_file_prompts(path, records, None)
    return _memory_file_prompts(path, records, (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _memory_file_prompts(path: str, records: int, version) -> tuple[str, ...]:
    requests = load_config_records(path, records, "TPatcherConfig.memory_file")
    return tuple(dict.fromkeys(p for r in requests for p in [r.filled_prompt, *(probe.prompt for probe in r.locality)]))


# edited model -> (key, objects the key refers to, FFN inputs of its fixed memory prompts): in sequential editing the
# patches stack at one FFN, whose inputs they do not change, so the memory set is run through the model only once
_FIXED_MEMORY_INPUTS = weakref.WeakKeyDictionary()


def max_margin_direction(edit_input, memory, steps=300, sharpness=50.0, lr=1e-2):
    """The unit direction `u` that (nearly) maximizes the smallest gap `u·(edit_input - m)` over the memory inputs `m`:
    gradient descent on a smoothed maximum of `u·(m - edit_input) / |edit_input|` (a log-sum-exp at `sharpness`),
    started from the ridge-regularized discriminant `(cov(memory) + λI)^-1 (edit_input - mean(memory))`."""
    with torch.no_grad():
        centered = memory - memory.mean(0)
        covariance = centered.T @ centered / max(len(memory) - 1, 1)
        ridge = 0.1 * covariance.diagonal().mean().clamp(min=1e-12)
        eye = torch.eye(len(edit_input), device=edit_input.device, dtype=edit_input.dtype)
        start = torch.linalg.solve(covariance + ridge * eye, edit_input - memory.mean(0))
        differences = (memory - edit_input) / edit_input.norm()
    direction = torch.nn.Parameter(start / start.norm().clamp(min=1e-12))
    optimizer = torch.optim.Adam([direction], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            unit = direction / direction.norm()
            loss = torch.logsumexp(differences @ unit * sharpness, 0) / sharpness
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (direction / direction.norm()).detach()


class TPatcherEditor(BaseEditor):
    """Trains `neurons_per_edit` patches per request beside the last FFN; the base weights are never touched.

    >>> from hf_knowedit import get_edited_model, EditRequest
    >>> from hf_knowedit.methods.tpatcher import TPatcherConfig
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> request = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
    >>> config = TPatcherConfig(num_steps=2)
    >>> edited = get_edited_model(tiny_model("gpt2"), config, [request], tokenizer=tiny_tokenizer())
    >>> edited.get_edit().components["transformer.h.3.mlp"][0].num_neurons
    1
    """

    config_class = TPatcherConfig

    def compute_components(self, edited_model, requests):
        config = self.config
        model = edited_model.base_model
        layout = edited_model.layout
        layer = config.resolve_layers(layout)[0]
        path = ffn_host_path(layout, layer)
        device = input_device(model)
        tokenizer = edited_model.tokenizer
        memory_prompts = list(config.memory_prompts if config.memory_prompts is not None else GENERIC_MEMORY_PROMPTS)
        if config.memory_file is not None:
            memory_prompts += memory_file_prompts(config.memory_file, config.memory_records)
        shared_memory = torch.cat([self.fixed_memory_inputs(edited_model, path, memory_prompts, device),
                                   self.ffn_inputs(edited_model, path, [p.prompt for r in requests for p in r.locality],
                                                   device)])
        # every request's prompt is memory for the other requests' patches: their FFN inputs, once, split per prompt
        request_inputs = self.ffn_inputs(edited_model, path, [r.filled_prompt for r in requests], device,
                                         per_prompt=True)
        patches, fire_rates, value_scales = [], [], []
        for index, request in enumerate(tqdm(requests, desc="T-Patcher edit", leave=False)):
            batch = encode_prompt_target(tokenizer, [request.filled_prompt], [request.target_new], model=model)
            batch = batch.to(device)
            with torch.no_grad(), record_module_io(model, path) as records:
                edited_model(**batch.model_inputs())
            position = key_positions(batch)[0]
            edit_input = records["input"][-1][0, position].float()
            memory = [shared_memory, records["input"][-1][0, :position].float()]
            memory = torch.cat(memory + [inputs for j, inputs in enumerate(request_inputs) if j != index])
            patch, scale = self.train_patch(edited_model, path, layer, batch, position, edit_input, memory)
            value_scales.append(scale)
            with torch.no_grad():
                fire_rate = float((patch.scores(memory) > 0).float().mean()) if len(memory) else 0.0
            if fire_rate > config.max_memory_fire_rate:
                raise EditFailedError(
                    f"T-Patcher: the patch of request {index} ({request.filled_prompt!r} -> {request.target_new!r}) "
                    f"fires on {fire_rate:.1%} of its {len(memory)} memory inputs after training (more than "
                    f"TPatcherConfig.max_memory_fire_rate={config.max_memory_fire_rate}): its edit input does not "
                    "score above them, so it would fire on most unrelated prompts. The model is unchanged. Set "
                    "key_init='max_margin', train_key=False and key_scale=40 (a fixed key that separates the edit "
                    "input from the memory), change the memory set, or raise max_memory_fire_rate to accept such "
                    "patches.")
            fire_rates.append(fire_rate)
            patches.append(patch)
        combined = patches[0]
        for patch in patches[1:]:
            combined = combined.combine(patch)
        self.stats = {"tpatcher_memory_fire_rate": max(fire_rates), "tpatcher_value_scale": max(value_scales),
                      "tpatcher_neurons": combined.num_neurons}
        return {path: combined}

    @classmethod
    def fixed_memory_inputs(cls, edited_model, path, prompts, device):
        """`ffn_inputs` of the config's memory prompts, reused while the model computes the same up to `path`."""
        state, objects = edited_model.computation_state(excluding=path)
        key = (state, path, tuple(prompts), str(device))
        cached = _FIXED_MEMORY_INPUTS.get(edited_model)
        if cached is not None and cached[0] == key:
            return cached[2]
        inputs = cls.ffn_inputs(edited_model, path, prompts, device)
        _FIXED_MEMORY_INPUTS[edited_model] = (key, objects, inputs)
        return inputs

    @staticmethod
    def ffn_inputs(edited_model, path, prompts, device, per_prompt=False, chunk=32):
        """The FFN inputs at every (non-padding) position of `prompts`, `(positions, hidden)`, or with `per_prompt`
        one such tensor per prompt; `chunk` prompts per forward pass."""
        model = edited_model.base_model
        found = []
        for start in range(0, len(prompts), chunk):
            inputs = edited_model.tokenizer(prompts[start:start + chunk], return_tensors="pt", padding=True).to(device)
            kwargs = dict(inputs)
            if model.config.is_encoder_decoder:  # the patched FFN is in the decoder: feed each prompt to both sides
                kwargs["decoder_input_ids"] = inputs["input_ids"]
            with torch.no_grad(), record_module_io(model, path) as records:
                edited_model(**kwargs)
            mask = inputs["attention_mask"].bool()
            positions = records["input"][-1][mask].float()
            found += positions.split(mask.sum(1).tolist()) if per_prompt else [positions]
        if per_prompt:
            return found
        return torch.cat(found) if found else torch.empty(0, model.config.hidden_size, device=device)

    def train_patch(self, edited_model, path, layer, batch, position, edit_input, memory) -> tuple[SideFFN, float]:
        """Train one patch: edit loss + a · activation loss + m · memory loss (Huang et al. 2023, Eq. 6); returns it
        silenced on the memory, with the factor its value was scaled by (see `silence_on_memory`)."""
        config = self.config
        n = config.neurons_per_edit
        key = edit_input / edit_input.norm().pow(2)  # score 1 on the edit input (then key_scale)
        if config.key_init == "max_margin" and len(memory):
            direction = max_margin_direction(edit_input, memory)
            if direction @ edit_input > 0:
                key = direction / (direction @ edit_input)
            else:  # scaling it to score 1 on the edit input would flip it
                logger.warning("T-Patcher: the max-margin direction scores the edit input at or below 0; this patch "
                               "starts from the edit input itself (key_init='edit_input').")
        threshold = float((memory @ key).max().clamp(max=1.0)) if len(memory) else 0.0
        bias = -(1.0 + threshold) / 2  # halfway between the edit input and the closest out-of-scope input
        key, bias = key * config.key_scale, bias * config.key_scale  # the edit input scores key_scale
        patch = SideFFN(key.repeat(n, 1), torch.full((n,), bias), torch.zeros(n, key.shape[0]), "relu",
                        trainable=True).to(edit_input.device)
        if not config.train_key:
            patch.keys.requires_grad_(False)
        optimizer = torch.optim.Adam([q for q in patch.parameters() if q.requires_grad], lr=config.lr)
        with edited_model.temporary_components({path: patch}), torch.enable_grad():
            target_log_probs = ResumedTargetLogProbs(edited_model, batch, layer)
            for _ in range(config.num_steps):
                optimizer.zero_grad(set_to_none=True)
                edit_loss = -target_log_probs().mean()
                scale = patch.keys.norm(dim=-1) * edit_input.norm()  # scores in units of the initial key
                activation_loss = torch.relu(config.margin - patch.scores(edit_input) / scale).mean()
                memory_loss = self.memory_loss(patch.scores(memory) / scale) if len(memory) else 0
                loss = edit_loss + config.activation_weight * activation_loss + config.memory_weight * memory_loss
                if not torch.isfinite(loss):
                    raise EditFailedError(f"The T-Patcher loss became {loss.item()}; lower TPatcherConfig.lr.")
                loss.backward()
                optimizer.step()
        return self.silence_on_memory(patch, edit_input, memory, config.max_value_scale)

    def memory_loss(self, scores):
        """The memory hinge `relu(score + margin)` on `scores` `(memory inputs, patches)`, averaged per patch over
        all memory inputs or over its `memory_top_k` highest-scoring ones."""
        top_k = self.config.memory_top_k
        if top_k is not None and top_k < len(scores):
            scores = scores.topk(top_k, dim=0).values
        return torch.relu(scores + self.config.margin).mean()

    @staticmethod
    def silence_on_memory(patch: SideFFN, edit_input, memory, max_scale=None) -> tuple[SideFFN, float]:
        """Raise each patch's threshold above every out-of-scope score when the edit input still scores higher, and
        scale its value so that its output on the edit input is unchanged: the memory loss made exact. Returns the
        patch and the largest factor a value was scaled by: the closer a memory input scores to the edit input, the
        larger it is, and the more a prompt just past the threshold is changed. With `max_scale`, the threshold is
        raised only as far as a factor of `max_scale` allows."""
        with torch.no_grad():
            raw_edit = patch.keys @ edit_input
            raw_memory = (memory @ patch.keys.T).max(0).values if len(memory) else torch.full_like(raw_edit, -1e9)
            separable = raw_edit > raw_memory
            floor = -(raw_memory + 0.5 * (raw_edit - raw_memory))  # halfway
            old_activation = raw_edit + patch.biases
            if max_scale is not None:  # the activation on the edit input may shrink by max_scale at most
                floor = torch.maximum(floor, old_activation / max_scale - raw_edit)
            bias = torch.where(separable, torch.minimum(patch.biases, floor), patch.biases)
            new_activation = raw_edit + bias
            ratio = torch.where(separable & (old_activation > 0), old_activation / new_activation.clamp(min=1e-12), 1.0)
            return SideFFN(patch.keys, bias, patch.values * ratio[:, None], patch.activation), float(ratio.max())
