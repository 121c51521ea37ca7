"""Running a model from block `start` on, with the residual stream entering that block computed once.

Optimising a target value (ROME §3.1 Eq. 4, MEMIT Eq. 16) changes the model only from the edited layer on, so the
blocks before it compute the same thing at every step. :class:`ResumableForward` runs the full model once, keeps the
hidden states entering block `start` and the keyword arguments every later block was called with (attention masks,
rotary position embeddings, ...), and from then on calls only blocks `start..L-1`, the final norm and the LM head.

The blocks are called directly with the arguments the model itself gave them, so nothing is architecture-specific.
The first resumed pass is checked against the model's own logits; when they differ (a model that does more than
`lm_head(norm(h))` after its blocks, e.g. a projection or logit soft-capping that is not recognised), the class falls
back to the full forward pass and says so in the log.
"""

import torch

from ..deltas import as_token_grid, first_tensor, replace_first_tensor
from ..utils import get_logger


logger = get_logger(__name__)


class _Capture:
    def __init__(self):
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.hidden: torch.Tensor | None = None


class ResumableForward:
    """Logits of a fixed batch at chosen positions, recomputing only blocks `start..L-1` at each call.

    Args:
        model: the base model (with the edit hooks of an `EditedModel` on it, which keep applying).
        layout (`ModelLayout`): its layout.
        input_ids, attention_mask (`torch.Tensor`): the batch, right-padded.
        start (`int`): the first block to recompute.
        rows, cols (`torch.Tensor`): the positions whose logits :meth:`logits` returns, `(n,)` each.
    """

    def __init__(self, model, layout, input_ids, attention_mask, start: int, rows, cols):
        self.model, self.layout, self.start = model, layout, start
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.rows, self.cols = rows, cols
        blocks = layout.blocks(model)
        capture = _Capture()
        handles = []
        for index in range(start, layout.num_layers):
            def pre_hook(module, args, kwargs, index=index):
                if index == start:
                    capture.hidden = first_tensor(args[0] if args else kwargs["hidden_states"]).detach()
                capture.calls[index] = (tuple(args[1:]) if args else (), {k: v for k, v in kwargs.items()
                                                                        if k != "hidden_states"})
            handles.append(blocks[index].register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            with torch.no_grad():
                reference = self._full_logits()
        finally:
            for handle in handles:
                handle.remove()
        self._capture = capture
        self.resumable = capture.hidden is not None and len(capture.calls) == layout.num_layers - start
        if self.resumable:
            with torch.no_grad():
                resumed = self._resumed_logits()
            scale = reference.abs().max().clamp(min=1.0)
            self.resumable = resumed.shape == reference.shape and bool(
                ((resumed - reference).abs().max() / scale) < 1e-3
            )
        if not self.resumable:
            logger.info(
                "Cannot resume %s from block %d (its head is not lm_head(norm(h))); using the full forward pass.",
                type(model).__name__, start,
            )
        self.initial_logits = reference

    def _full_logits(self) -> torch.Tensor:
        logits = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=False).logits
        return logits[self.rows, self.cols].float()

    def _resumed_logits(self) -> torch.Tensor:
        blocks = self.layout.blocks(self.model)
        hidden = self._capture.hidden
        for index in range(self.start, self.layout.num_layers):
            args, kwargs = self._capture.calls[index]
            hidden = first_tensor(blocks[index](hidden, *args, **kwargs))
        selected = hidden[self.rows, self.cols]
        logits = self.layout.lm_head(self.model)(self.layout.final_norm(self.model)(selected))
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def logits(self) -> torch.Tensor:
        """Logits `(n, vocab)` in fp32 at `(rows, cols)`, with whatever hooks are on the model now."""
        return self._resumed_logits() if self.resumable else self._full_logits()


def add_at_positions(output, rows, cols, values, batch_shape):
    """`output` (a tensor or a tuple starting with one) with `values` added at `(rows, cols)`; differentiable.

    `batch_shape` is `(batch, seq)`; an output flattened to `(batch * seq, d)` (OPT's MLP) is handled too.
    """
    hidden = first_tensor(output)
    shape = hidden.shape
    hidden = as_token_grid(hidden, batch_shape).index_put((rows, cols), values.to(hidden.dtype), accumulate=True)
    return replace_first_tensor(output, hidden.view(shape))


class ResumedTargetLogProbs:
    """`batch.target_log_probs(edited_model(**batch.model_inputs()).logits)` with only blocks `start..L-1` recomputed.

    For methods that train something at or after block `start` against a fixed prompt and target (T-Patcher's patch,
    GRACE's value): the residual stream entering that block does not change between steps. Encoder-decoder models,
    models :class:`ResumableForward` cannot resume, and edited models that route whole prompts (SERAC, IKE edits
    active) run the full forward pass.

    Args:
        edited_model (`EditedModel`): the model; the hooks of the components being trained must be on it whenever
            the instance is created or called.
        batch (`PromptTargetBatch`): a prompt-target batch on the model's input device.
        start (`int`): the first block whose computation can change.
    """

    def __init__(self, edited_model, batch, start: int):
        self.edited_model, self.batch = edited_model, batch
        self.forward = None
        if not batch.is_encoder_decoder and not edited_model.routes_prompts:
            rows, cols = torch.nonzero(batch.labels != -100, as_tuple=True)
            self.labels, self.rows = batch.labels[rows, cols], rows
            self.counts = torch.bincount(rows, minlength=batch.labels.shape[0]).clamp(min=1)
            forward = ResumableForward(edited_model.base_model, edited_model.layout, batch.input_ids,
                                       batch.attention_mask, start, rows, cols - 1)
            self.forward = forward if forward.resumable else None

    def __call__(self) -> torch.Tensor:
        """Per-example mean log-probability of the target tokens, `(batch,)`, fp32, differentiable."""
        if self.forward is None:
            return self.batch.target_log_probs(self.edited_model(**self.batch.model_inputs()).logits)
        log_probs = self.forward.logits().log_softmax(-1).gather(-1, self.labels[:, None]).squeeze(-1)
        sums = torch.zeros(self.counts.shape, dtype=log_probs.dtype, device=log_probs.device)
        return sums.index_add(0, self.rows, log_probs) / self.counts
