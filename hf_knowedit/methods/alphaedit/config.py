from dataclasses import dataclass, field
from typing import ClassVar

from ...errors import EditConfigError
from ...locate import LocateThenEditConfig
from ..memit.config import window_layers


@dataclass
class AlphaEditConfig(LocateThenEditConfig):
    """AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models").

    MEMIT's multi-layer edit with the update projected onto the null space of the preserved keys' second moment, so
    that `ΔW k₀ = 0` for the knowledge to keep (Eq. 12). The keys of every request already edited into the model
    (all active edits) join the solve as `K_p K_pᵀ`, which keeps long sequences of edits stable. Shared fields:
    :class:`~hf_knowedit.locate.LocateThenEditConfig`.

    Args:
        layers (`list[int]`, *optional*, defaults to `None`):
            Consecutive blocks; `None` takes up to 5 layers from 13% of the depth, as MEMIT.
        nullspace_threshold (`float`, *optional*, defaults to `0.02`):
            Eigenvalues of `E[kkᵀ]` below this span the null space that updates are confined to.
        nullspace_relative (`bool`, *optional*, defaults to `False`):
            Read `nullspace_threshold` as a fraction of the largest eigenvalue (carries over between models whose
            activations differ in scale) instead of an absolute eigenvalue as in the reference code.
        l2_regularization (`float`, *optional*, defaults to `10.0`):
            `α` of Eq. 12, the ridge term that keeps the solve well-posed.
        clamp_norm_factor (`float`, *optional*, defaults to `0.75`):
            As MEMIT.
    """

    edit_type: ClassVar[str] = "alphaedit"

    nullspace_threshold: float = field(default=2e-2, metadata={"help": "Eigenvalue threshold of the null space."})
    nullspace_relative: bool = field(default=False, metadata={"help": "Threshold relative to the top eigenvalue."})
    l2_regularization: float = field(default=10.0, metadata={"help": "α, the ridge term of Eq. 12."})
    clamp_norm_factor: float = field(default=0.75, metadata={"help": "||δ|| <= clamp_norm_factor * ||h||."})

    def __post_init__(self):
        super().__post_init__()
        if not self.nullspace_threshold >= 0:
            raise EditConfigError(
                f"AlphaEditConfig.nullspace_threshold must be non-negative, got {self.nullspace_threshold!r}."
            )
        if not self.l2_regularization > 0:
            raise EditConfigError(
                f"AlphaEditConfig.l2_regularization must be positive, got {self.l2_regularization!r}."
            )
        if not self.mom2_adjustment:
            raise EditConfigError(
                "AlphaEditConfig.mom2_adjustment must be True: the null space comes from the keys' second moment."
            )

    def default_layers(self, layout):
        return window_layers(layout)
