from dataclasses import dataclass, field
from typing import ClassVar

from ...errors import EditConfigError
from ...locate import LocateThenEditConfig


def window_layers(layout, fraction: float = 0.13, max_count: int = 5) -> list[int]:
    """A window of consecutive early-middle layers: `min(max_count, max(2, L // 4))` of them from `fraction` depth.

    GPT-J (28 layers) gets 4..8 (MEMIT uses 3..8), Llama-3-8B (32) 4..8 as AlphaEdit, SmolLM2-135M (30) 4..8.
    """
    count = min(max_count, max(2, layout.num_layers // 4))
    return layout.default_layers(fraction=fraction, count=count)


@dataclass
class MEMITConfig(LocateThenEditConfig):
    """Mass-Editing Memory in a Transformer (MEMIT; Meng et al. 2023, "Mass-Editing Memory in a Transformer").

    Thousands of facts at once: the target residual of each fact is optimised at the last edited layer, then spread
    over a window of consecutive MLPs, each solving Eq. 14 `ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹` in fp64. Each layer's update is
    stored as factors of rank at most the batch size. Shared fields: :class:`~hf_knowedit.locate.LocateThenEditConfig`.

    Args:
        layers (`list[int]`, *optional*, defaults to `None`):
            Consecutive blocks to spread the edit over; `None` takes up to 5 layers from 13% of the depth.
        mom2_update_weight (`float`, *optional*, defaults to `15000.0`):
            λ, the weight of the preserved keys' second moment against the new keys (MEMIT's GPT-J value; 20000
            for GPT-2 XL).
        clamp_norm_factor (`float`, *optional*, defaults to `0.75`):
            MEMIT bounds the residual change more tightly than ROME.
    """

    edit_type: ClassVar[str] = "memit"

    mom2_update_weight: float = field(default=15000.0, metadata={"help": "λ, weight of the preserved second moment."})
    clamp_norm_factor: float = field(default=0.75, metadata={"help": "||δ|| <= clamp_norm_factor * ||h||."})

    def __post_init__(self):
        super().__post_init__()
        if not self.mom2_update_weight > 0:
            raise EditConfigError(f"MEMITConfig.mom2_update_weight must be positive, got {self.mom2_update_weight!r}.")

    def default_layers(self, layout):
        return window_layers(layout)
