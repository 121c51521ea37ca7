"""Integrated-gradients attribution of MLP neurons (Dai et al. 2022, §3.2, eq. 2-3).

For a prompt, the activation `w_i` of neuron `i` (the `i`-th input of the MLP output projection, at the position that
predicts the answer) is scaled from 0 to its value; the attribution is
`Attr(w_i) = w_i · ∫₀¹ ∂P(y* | α w_i)/∂w_i dα`, approximated by a Riemann sum over `steps` points computed as one
batch. The whole activation vector of a layer is scaled at once, as in the paper, so one pass attributes every
neuron of that layer.

In a decoder-only model the scaling at the last prompt position cannot reach the positions before it, so the prompt's
prefix is run once (batch 1) and its key/value cache is shared by the scaled copies, which then run a single token
each: about `seq_len` times less work than running the whole prompt for every copy. The first cached pass of a prompt
is checked against the full model's logits; a model whose cache gives other logits is attributed without it.

The layers are attributed together: the `steps` copies of each of `layers_per_pass` layers (each copy scaling its own
layer's activation and leaving the others as they are) run as one batch of `steps × layers_per_pass` rows and one
backward pass, instead of a forward and backward pass per layer. The rows are independent, so each layer's gradients
are those of a pass of its own: on the default model (30 layers, 20 steps, one CPU thread) 8 layers per pass are 2.9x
faster per prompt than one, with the same attributions to the bit (`benchmarks/bench_kn.py --n 2 --layers-per-pass
all,10,8,1`).
"""

from dataclasses import dataclass

import torch
from torch import nn

from ...deltas import as_token_grid, first_tensor
from ...devices import input_device
from ...precision import model_dtype
from ...tokenization import encode_prompt_target
from ...utils import get_logger


logger = get_logger(__name__)


@dataclass
class PromptProbe:
    """A prompt ready for attribution: the model inputs of the prompt alone, and the position that predicts."""

    inputs: dict[str, torch.Tensor]
    position: int
    reference_logits: torch.Tensor | None = None
    prefix_cache_checked: bool = False
    use_prefix_cache: bool = True

    @property
    def token_shape(self) -> torch.Size:
        """`(batch, seq)` of the tokens at the edited layers (the decoder's for encoder-decoders)."""
        return self.inputs.get("decoder_input_ids", self.inputs["input_ids"]).shape


def prompt_probe(model, tokenizer, prompt: str, target: str) -> tuple[PromptProbe, int]:
    """The probe of `prompt` and the first token id of `target` after it."""
    batch = encode_prompt_target(tokenizer, [prompt], [target], model=model)
    device = input_device(model)
    if batch.is_encoder_decoder:
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "decoder_input_ids": batch.decoder_input_ids[:, :1]}
        position, token = 0, int(batch.labels[0, 0])
    else:
        length = batch.prompt_lengths[0]
        inputs = {"input_ids": batch.input_ids[:, :length], "attention_mask": batch.attention_mask[:, :length]}
        position, token = length - 1, int(batch.labels[0, length])
    return PromptProbe({k: v.to(device) for k, v in inputs.items()}, position), token


@torch.no_grad()
def top_prediction(model, probe: PromptProbe) -> int:
    """The model's most likely next token at the probe's position."""
    return int(model(**probe.inputs).logits[0, probe.position].argmax())


def neuron_activations(model, modules: dict[int, nn.Module], probe: PromptProbe) -> dict[int, torch.Tensor]:
    """The input of each layer's MLP output projection at the probe's position, `(intermediate,)`."""
    captured = {}

    def make_hook(layer):
        def hook(module, args):
            x = as_token_grid(first_tensor(args), probe.token_shape)
            captured[layer] = x[0, probe.position].detach().float()

        return hook

    handles = [m.register_forward_pre_hook(make_hook(layer)) for layer, m in modules.items()]
    try:
        with torch.no_grad():
            probe.reference_logits = model(**probe.inputs).logits[0, probe.position].detach().float().clone()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def integrated_gradients(model, modules: dict[int, nn.Module], probe: PromptProbe, activations: dict[int, torch.Tensor],
                         token: int, steps: int, layers_per_pass: int | None = None) -> dict[int, torch.Tensor]:
    """`Attr(w_i)` for every neuron of every layer of `modules`, `{layer: (intermediate,)}`: the `steps` scaled copies
    of `layers_per_pass` layers (all by default) run as one batch, each copy scaling its own layer's activation."""
    layers = list(modules)
    size = layers_per_pass or len(layers)
    attributions = {}
    for start in range(0, len(layers), size):
        group = layers[start : start + size]
        attributions.update(_attribute_pass(model, {layer: modules[layer] for layer in group}, probe,
                                            {layer: activations[layer] for layer in group}, token, steps))
    return attributions


def _attribute_pass(model, modules: dict[int, nn.Module], probe: PromptProbe, activations: dict[int, torch.Tensor],
                    token: int, steps: int) -> dict[int, torch.Tensor]:
    """The attributions of `modules`' layers from one batch of `steps` copies per layer."""
    scaled = {layer: (torch.arange(1, steps + 1, device=a.device, dtype=torch.float32)[:, None] / steps * a[None])
              .requires_grad_(True) for layer, a in activations.items()}  # α = 1/steps ... 1, on each layer's device
    cached = _prefix_cached_inputs(model, probe, steps * len(modules))
    logits = _scaled_logits(model, modules, probe, scaled, cached)
    if cached is not None and not probe.prefix_cache_checked:
        probe.prefix_cache_checked = True
        # the last copy of the first layer scales by 1: the model's own forward pass
        if not _agrees(logits[steps - 1].detach(), probe.reference_logits, model_dtype(model)):
            logger.warning("The key/value cache of %s gives other logits than its full forward pass: attributing "
                           "without it (slower).", type(model).__name__)
            probe.use_prefix_cache = False
            logits = _scaled_logits(model, modules, probe, scaled, None)
    # ∂P/∂w = P · ∂log P/∂w, row by row (the copies are independent): the gradient of log P keeps its size when the
    # answer is all but impossible (the old answer after hundreds of KN edits in a stream), where that of P falls
    # below fp32's normal range and a CPU's denormal arithmetic is several times slower
    # (`benchmarks/bench_kn.py --edit` times a request on an edited model)
    with torch.enable_grad():
        log_probabilities = logits.log_softmax(-1)[:, token]
        grads = torch.autograd.grad(log_probabilities.sum(), list(scaled.values()))
    probabilities = log_probabilities.detach().exp()
    attributions, first_row = {}, 0
    for layer, g in zip(scaled, grads, strict=True):
        rows = probabilities[first_row : first_row + g.shape[0], None]
        attributions[layer] = activations[layer] * (rows * g).mean(0)
        first_row += g.shape[0]
    return attributions


def _scaled_logits(model, modules: dict[int, nn.Module], probe: PromptProbe, scaled: dict[int, torch.Tensor],
                   cached: dict | None):
    """Logits at the predicting position of the scaled copies, `(steps × layers, vocab)` fp32, in the graph of
    `scaled`: rows `k·steps` to `(k+1)·steps` scale the activation of the `k`-th layer; the whole prompt per copy, or
    its last token over the shared prefix cache (`cached`)."""
    rows = sum(s.shape[0] for s in scaled.values())
    if cached is None:
        inputs = {k: v.expand(rows, *v.shape[1:]) for k, v in probe.inputs.items()}
        position, seq_len = probe.position, probe.token_shape[1]
    else:
        inputs, position, seq_len = cached, 0, 1

    def make_hook(first_row: int, values: torch.Tensor):
        def hook(module, args):
            x = first_tensor(args)
            grid = as_token_grid(x, (rows, seq_len)).clone()
            grid[first_row : first_row + values.shape[0], position] = values.to(grid.dtype)
            return (grid.view(x.shape), *args[1:])

        return hook

    handles, first_row = [], 0
    for layer, module in modules.items():
        handles.append(module.register_forward_pre_hook(make_hook(first_row, scaled[layer])))
        first_row += scaled[layer].shape[0]
    try:
        with torch.enable_grad():
            return model(**inputs).logits[:, position].float()
    finally:
        for handle in handles:
            handle.remove()


def _prefix_cached_inputs(model, probe: PromptProbe, copies: int) -> dict | None:
    """The inputs of the last prompt token for `copies` copies sharing the prefix's key/value cache, or `None` where
    the full prompt must run (encoder-decoders, a one-token prompt, a model without a cache, a failed check)."""
    if (not probe.use_prefix_cache or probe.reference_logits is None or "decoder_input_ids" in probe.inputs
            or probe.position == 0 or probe.position != probe.inputs["input_ids"].shape[1] - 1):
        return None
    input_ids, attention_mask = probe.inputs["input_ids"], probe.inputs["attention_mask"]
    with torch.no_grad():
        prefix = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], use_cache=True)
    cache = getattr(prefix, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        probe.use_prefix_cache = False
        return None
    cache.batch_repeat_interleave(copies)
    return {"input_ids": input_ids[:, -1:].expand(copies, 1), "attention_mask": attention_mask.expand(copies, -1),
            "past_key_values": cache, "use_cache": True}


def _agrees(logits: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether two logit vectors are equal up to the rounding of the model's dtype."""
    tolerance = max(1e-3, torch.finfo(dtype).eps ** 0.5) * max(1.0, float(reference.abs().max()))
    return float((logits.to(reference.device) - reference).abs().max()) <= tolerance


def select_neurons(attributions: list[dict[int, torch.Tensor]], threshold: float, share: float,
                   max_neurons: int | None) -> list[tuple[int, int]]:
    """Knowledge neurons `(layer, index)` from the attributions of several prompts (Dai et al. 2022, §3.3).

    Per prompt, the neurons above `threshold × max attribution`; across prompts, those kept for at least `share` of
    them (the edit prompt's own when none is). Sorted by mean attribution, at most `max_neurons`.
    """
    votes: dict[tuple[int, int], int] = {}
    per_prompt = []
    for by_layer in attributions:
        peak = max(float(a.max()) for a in by_layer.values())
        kept = {(layer, int(i)) for layer, a in by_layer.items()
                for i in torch.nonzero(a > threshold * peak).flatten().tolist()} if peak > 0 else set()
        per_prompt.append(kept)
        for neuron in kept:
            votes[neuron] = votes.get(neuron, 0) + 1
    needed = share * len(attributions)
    selected = [n for n, count in votes.items() if count >= needed] or sorted(per_prompt[0])
    mean = {n: sum(float(a[n[0]][n[1]]) for a in attributions) / len(attributions) for n in selected}
    selected.sort(key=lambda n: (-mean[n], n))
    return selected[:max_neurons] if max_neurons else selected
