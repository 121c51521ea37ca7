"""What gradient-based learned editors (MEND, KE) share: the gradient of the edit loss at a linear layer, in factored
form, low-rank updates that stay differentiable, and the training losses.

For a linear layer `y = W u`, the gradient of a loss summed over tokens is `∇W = Σ_t δ_t u_tᵀ`, with `u_t` the layer's
input and `δ_t = ∂L/∂y_t` the gradient at its output (Mitchell et al. 2022, "Fast Model Editing at Scale", §3.1). Both
factors are captured with forward hooks in one forward and one backward pass, for the decoder-only models and for T5
(whose edited layers are the decoder's: the decoder positions are the tokens).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..deltas import as_token_grid, first_tensor, replace_first_tensor
from ..devices import input_device
from ..errors import EditRequestError
from ..requests import EditRequest
from ..tokenization import PromptTargetBatch, encode_prompt_target
from ..utils import get_logger


logger = get_logger(__name__)


@dataclass
class LayerGradient:
    """The factors of `∇W = δᵀ u` at one layer: `inputs` `u` `(T, in)` and `output_grads` `δ` `(T, out)`, fp32;
    `request_index` `(T,)` says which request of the batch each token belongs to."""

    inputs: torch.Tensor
    output_grads: torch.Tensor
    request_index: torch.Tensor


def mlp_module_paths(layout, layers: list[int], target_modules: str) -> list[str]:
    """Paths of the MLP weights a gradient-based editor changes: the output projection of each layer, and with
    `target_modules="mlp_in_out"` its input projections too."""
    paths = []
    for layer in layers:
        if target_modules == "mlp_in_out":
            paths.extend(layout.mlp_in_paths(layer))
        paths.append(layout.mlp_out_path(layer))
    return paths


def token_mask(batch: PromptTargetBatch) -> torch.Tensor:
    """`(batch, seq)` mask of the real tokens at the edited layers (decoder positions for encoder-decoders)."""
    if batch.is_encoder_decoder:
        return batch.labels != -100
    return batch.attention_mask.bool()


def encode(tokenizer, model, prompts: list[str], targets: list[str]) -> PromptTargetBatch:
    return encode_prompt_target(tokenizer, prompts, targets, model=model).to(input_device(model))


GRADIENT_CHUNK = 32
"""Requests per forward and backward pass of :func:`layer_gradients`: each token's factors depend on its own request
only, so a large batch of edits (MEND's or KE's batch of 1,000) is taken in chunks with the same result, and the
activations held at once are those of `GRADIENT_CHUNK` requests."""


def layer_gradients(
    model: nn.Module, paths: list[str], batch: PromptTargetBatch, chunk_size: int = GRADIENT_CHUNK
) -> dict[str, LayerGradient]:
    """`u` and `δ` at each module of `paths` for the loss `Σ_requests NLL(target)` of `batch` (the edit loss), from
    one forward and backward pass per `chunk_size` requests.

    The base weights need no gradient: the outputs of the hooked modules are made differentiable leaves when nothing
    upstream requires a gradient.
    """
    parts = [_chunk_gradients(model, paths, part, start) for start, part in batch.row_chunks(chunk_size)]
    if len(parts) == 1:
        return parts[0]
    return {path: LayerGradient(*(torch.cat([getattr(part[path], name) for part in parts])
                                  for name in ("inputs", "output_grads", "request_index")))
            for path in paths}


def _chunk_gradients(model, paths, batch: PromptTargetBatch, first_request: int) -> dict[str, LayerGradient]:
    captured_inputs, captured_outputs = {}, {}

    def make_hook(path):
        def hook(module, args, output):
            captured_inputs[path] = first_tensor(args).detach()
            out = first_tensor(output)
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            captured_outputs[path] = out
            return replace_first_tensor(output, out)

        return hook

    handles = [model.get_submodule(p).register_forward_hook(make_hook(p)) for p in paths]
    try:
        with torch.enable_grad():
            logits = model(**batch.model_inputs()).logits
            loss = -batch.target_log_probs(logits).sum()
            grads = torch.autograd.grad(loss, [captured_outputs[p] for p in paths], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    mask = token_mask(batch)
    request_index = torch.nonzero(mask)[:, 0] + first_request
    result = {}
    for path, grad in zip(paths, grads, strict=True):
        inputs = as_token_grid(captured_inputs[path], mask.shape)
        grad = torch.zeros(*inputs.shape[:-1], captured_outputs[path].shape[-1], device=inputs.device) \
            if grad is None else as_token_grid(grad, mask.shape)
        result[path] = LayerGradient(inputs[mask].float(), grad[mask].float(), request_index)
    return result


@contextlib.contextmanager
def low_rank_updates(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Inside the block, each module `path` computes `W x + up @ (down @ x)` (`up` `(out, r)`, `down` `(r, in)`).

    Unlike :class:`~hf_knowedit.LowRankDelta`, the factors keep their autograd graph, so a loss after the edit trains
    the network that made them.
    """

    def make_hook(up, down):
        def hook(module, args, output):
            x = first_tensor(args)
            out = first_tensor(output)
            update = (x.float() @ down.T) @ up.T
            return replace_first_tensor(output, out + update.to(out.dtype))

        return hook

    handles = [model.get_submodule(p).register_forward_hook(make_hook(up, down)) for p, (up, down) in factors.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- losses -----------------------------------------------------------------------------------------------------------
def generalization_prompts(requests: list[EditRequest]) -> tuple[list[str], list[str]]:
    """The prompts the edit must generalise to, with `target_new`: each request's first rephrase, else its prompt."""
    prompts = [r.rephrase_prompts[0] if r.rephrase_prompts else r.filled_prompt for r in requests]
    return prompts, [r.target_new for r in requests]


def locality_prompts(requests: list[EditRequest]) -> tuple[list[str], list[str]]:
    """The prompts the edit must leave unchanged, with a continuation to compare the distributions on.

    Each request's first locality probe (continued by its answer, else by the request's `target_true` or
    `target_new`). A request without locality probes borrows the edit prompt of the next request in the batch,
    continued by that request's `target_true` (or `target_new`): another fact, which this edit must not change.
    """
    prompts, continuations = [], []
    for index, request in enumerate(requests):
        if request.locality:
            probe = request.locality[0]
            prompts.append(probe.prompt)
            continuations.append(probe.answers[0] if probe.answers else request.target_true or request.target_new)
        elif len(requests) > 1:
            other = requests[(index + 1) % len(requests)]
            prompts.append(other.filled_prompt)
            continuations.append(other.target_true or other.target_new)
    return prompts, continuations


def check_locality_available(requests: list[EditRequest], batch_size: int) -> None:
    """Raise when the locality loss has nothing to work on: no locality probes and batches of one request."""
    if not any(r.locality for r in requests) and min(batch_size, len(requests)) < 2:
        raise EditRequestError(
            "The training requests have no locality prompts, and with batches of one request no other request's "
            "prompt can stand in for them. Give requests with locality probes (CounterFact's locality_prompt, zsRE's "
            "loc), or a batch_size of at least 2."
        )
    missing = sum(1 for r in requests if not r.locality)
    if missing:
        logger.info("%d of %d training requests have no locality prompt: each uses the edit prompt of another "
                    "request in its batch instead.", missing, len(requests))


def edit_nll(model: nn.Module, batch: PromptTargetBatch) -> torch.Tensor:
    """Mean over requests of the mean target-token negative log-likelihood."""
    return -batch.target_log_probs(model(**batch.model_inputs()).logits).mean()


def target_distributions_kl(base_logits: torch.Tensor, edited_logits: torch.Tensor,
                            batch: PromptTargetBatch) -> torch.Tensor:
    """`KL(p_base ‖ p_edited)` of the next-token distributions at the continuation's positions, averaged."""
    base = batch.target_logits(base_logits).float().log_softmax(-1)
    edited = batch.target_logits(edited_logits).float().log_softmax(-1)
    mask = (batch.labels != -100).float()
    kl = F.kl_div(edited, base, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def edit_and_locality_losses(model, tokenizer, requests, paths, make_factors, c_edit: float, c_loc: float):
    """The training objective of MEND and KE: `c_edit · L_edit + c_loc · L_loc`, and its metrics.

    `make_factors(edit_batch, gradients, requests)` returns `{path: (up, down)}`, the differentiable update the
    editor makes from the edit prompts' gradients. `L_edit` is the NLL of `target_new` on the generalisation prompts
    after the update; `L_loc` the KL between the base and edited model on the locality prompts.
    """
    edit_batch = encode(tokenizer, model, [r.filled_prompt for r in requests], [r.target_new for r in requests])
    gradients = layer_gradients(model, list(paths), edit_batch)
    factors = make_factors(edit_batch, gradients, requests)
    prompts, targets = generalization_prompts(requests)
    general_batch = encode(tokenizer, model, prompts, targets)
    loc_prompts, loc_continuations = locality_prompts(requests)
    metrics = {}
    with torch.no_grad():
        nll_before = float(edit_nll(model, general_batch))
        loc_batch = encode(tokenizer, model, loc_prompts, loc_continuations) if loc_prompts else None
        base_logits = model(**loc_batch.model_inputs()).logits if loc_batch is not None else None
    with low_rank_updates(model, factors):
        loss_edit = edit_nll(model, general_batch)
        if loc_batch is not None:
            loss_loc = target_distributions_kl(base_logits, model(**loc_batch.model_inputs()).logits, loc_batch)
        else:
            loss_loc = loss_edit.new_zeros(())
    metrics.update(edit_nll_before=nll_before, edit_nll_after=float(loss_edit.detach()),
                   locality_kl=float(loss_loc.detach()))
    return c_edit * loss_edit + c_loc * loss_loc, metrics
