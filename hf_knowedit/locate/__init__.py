"""The shared core of the locate-then-edit methods (ROME, MEMIT, AlphaEdit): one module per step of the paper.

* :mod:`.keys` - subject keys `k*` averaged over model-generated context prefixes (ROME Eq. 3);
* :mod:`.values` - target values `v*` by batched optimisation with the KL and norm constraints (ROME Eq. 4);
* :mod:`.resume` - the forward pass that recomputes only the blocks from the edited layer on;
* :mod:`.update` - the closed-form low-rank solves (ROME Eq. 2, MEMIT Eq. 14, AlphaEdit Eq. 12);
* :mod:`.base` - the shared config fields and editor skeleton.
"""

from .base import LocateThenEditConfig, LocateThenEditEditor, check_consistent_requests, layer_statistics
from .keys import compute_subject_keys, context_prefixes
from .resume import ResumableForward, ResumedTargetLogProbs
from .update import batch_update, null_space_update, rank_one_update
from .values import optimize_target_values


__all__ = [
    "LocateThenEditConfig",
    "LocateThenEditEditor",
    "ResumableForward",
    "ResumedTargetLogProbs",
    "batch_update",
    "check_consistent_requests",
    "compute_subject_keys",
    "context_prefixes",
    "layer_statistics",
    "null_space_update",
    "optimize_target_values",
    "rank_one_update",
]
