"""Half precision: edits are computed in fp32 or fp64 and applied to fp16/bf16 models; their effect is checked after
the cast.

Every method solves and optimises in fp32 (statistics in fp32 or fp64) and stores its deltas in fp32; the forward
hooks add a delta's contribution to the module's output in fp32 and round the sum once to the model's dtype. Rounding
can still swallow an edit: in bfloat16 (8 bits of mantissa) a change smaller than about 1/256 of an activation
vanishes, and merging a delta into bf16 or fp16 weights rounds every entry of `W + ΔW`. So, on a half-precision model,
:class:`~hf_knowedit.EditedModel` scores the edited targets before and after each edit (and before and after
`merge_edits`) in the model's own dtype, and warns with :class:`PrecisionWarning` when the edit did not measurably
raise a target's probability, or when merging lost most of the effect the unmerged edit had. The figures are kept in
the edit's `stats["precision_check"]`.
"""

import warnings

import torch

from .requests import EditRequest
from .scoring import BatchScorer


HALF_PRECISION = (torch.float16, torch.bfloat16)
MIN_EFFECT_NATS = 0.01
"""An edit that raises a target's mean token log-probability by less than this (in nats) has no measurable effect."""
MERGE_KEEP_FRACTION = 0.5
"""Merging must keep at least this fraction of the unmerged edit's effect on the targets."""
MAX_CHECKED_REQUESTS = 256
"""At most this many requests (the first ones) are scored for the check."""


class PrecisionWarning(UserWarning):
    """An edit's effect is lost, in whole or in part, to the rounding of a half-precision model."""


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none).

    >>> model_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16))
    torch.bfloat16
    """
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def is_half_precision(model: torch.nn.Module) -> bool:
    return model_dtype(model) in HALF_PRECISION


def target_log_probs(model, tokenizer, requests: list[EditRequest]) -> list[float]:
    """Mean token log-probability of each request's `target_new` after its prompt, in the model's current state."""
    checked = requests[:MAX_CHECKED_REQUESTS]
    scores = BatchScorer(model, tokenizer).score_targets([r.filled_prompt for r in checked],
                                                         [r.target_new for r in checked])
    return [score.mean_log_prob for score in scores]


def _describe(requests: list[EditRequest], indices: list[int], limit: int = 3) -> str:
    shown = ", ".join(f"{requests[i].filled_prompt!r} -> {requests[i].target_new!r}" for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def check_edit_effect(dtype: torch.dtype, requests: list[EditRequest], before: list[float],
                      after: list[float], edit_name: str) -> dict:
    """Compare the targets' log-probabilities before and after an edit; warn when some did not rise measurably.

    Returns the record kept in the edit's stats.

    >>> import warnings
    >>> from hf_knowedit import EditRequest
    >>> request = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     record = check_edit_effect(torch.bfloat16, [request], [-9.0], [-9.0], "default")
    >>> record["lost"], issubclass(caught[0].category, PrecisionWarning)
    ([0], True)
    """
    effects = [a - b for a, b in zip(after, before)]
    lost = [i for i, effect in enumerate(effects) if not effect >= MIN_EFFECT_NATS]
    if lost:
        warnings.warn(
            f"In {str(dtype).removeprefix('torch.')}, the edit {edit_name!r} raised the target's mean log-probability "
            f"by less than {MIN_EFFECT_NATS} nats for {len(lost)} of {len(effects)} checked request(s) "
            f"({_describe(requests, lost)}): its effect is lost to rounding, or the method did not reach the target. "
            "Load the model in float32 (at least the edited layers), or strengthen the edit (more steps, a higher "
            "learning rate).",
            PrecisionWarning,
            stacklevel=3,
        )
    return {"dtype": str(dtype).removeprefix("torch."), "min_effect_nats": MIN_EFFECT_NATS,
            "effects": [round(e, 6) for e in effects], "lost": lost}


def check_merge_effect(dtype: torch.dtype, requests: list[EditRequest], unedited: list[float], unmerged: list[float],
                       merged: list[float]) -> dict:
    """Warn when merging into half-precision weights lost most of the effect the edits had through hooks."""
    kept = []
    for base, hooked, after in zip(unedited, unmerged, merged):
        effect = hooked - base
        kept.append((after - base) / effect if effect >= MIN_EFFECT_NATS else 1.0)
    lost = [i for i, fraction in enumerate(kept) if not fraction >= MERGE_KEEP_FRACTION]
    if lost:
        warnings.warn(
            f"Merging into {str(dtype).removeprefix('torch.')} weights rounded away more than "
            f"{1 - MERGE_KEEP_FRACTION:.0%} of the edit's effect for {len(lost)} of {len(kept)} checked request(s) "
            f"({_describe(requests, lost)}). Keep the edit unmerged (its deltas are then added in float32), or merge "
            "into float32 weights.",
            PrecisionWarning,
            stacklevel=3,
        )
    return {"dtype": str(dtype).removeprefix("torch."), "kept_fraction": [round(k, 6) for k in kept], "lost": lost}
