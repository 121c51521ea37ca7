from dataclasses import dataclass, field
from typing import ClassVar

from ...errors import EditConfigError
from ...locate import LocateThenEditConfig


@dataclass
class ROMEConfig(LocateThenEditConfig):
    """Rank-One Model Editing (ROME; Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

    One MLP output projection `W` gets the rank-one update of Eq. 2 that maps the subject key `k*` to the optimised
    value `v*` while changing the outputs on other keys as little as possible under their second moment `C`. A batch
    of N requests is N sequential rank-one updates, each computed on top of the previous ones, stored together as one
    rank-N :class:`~hf_knowedit.deltas.LowRankDelta`. The shared fields (value optimisation, prefixes, statistics) are
    documented in :class:`~hf_knowedit.locate.LocateThenEditConfig`.

    Args:
        layers (`list[int]`, *optional*, defaults to `None`):
            Exactly one block; `None` takes the block at 17% of the depth (5 of 28 for GPT-J, 5 of 32 for
            Llama-7B, 5 of 30 for SmolLM2-135M).
        consistent_keys (`bool`, *optional*, defaults to `True`):
            The r-ROME fix (Gupta et al. 2024, "Rebuilding ROME"): the prefix-averaged key `k*` is used both for the
            update's direction and as the key that must map to `v*`. `False` reproduces the original code, which
            uses the bare prompt's key in the second place and can collapse the model in sequential editing.
        v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, mom2_adjustment:
            As in ROME's GPT-2 XL / GPT-J hyperparameters: 20 steps, 0.5, 0.5, 4, 0.0625, `True`.
    """

    edit_type: ClassVar[str] = "rome"

    consistent_keys: bool = field(default=True, metadata={"help": "r-ROME: the same averaged key at solve time."})
    v_num_grad_steps: int = field(default=20, metadata={"help": "Adam steps of the target-value optimisation."})

    def __post_init__(self):
        super().__post_init__()
        if self.layers is not None and len(self.layers) != 1:
            raise EditConfigError(
                f"ROMEConfig.layers must name exactly one layer, got {self.layers}; use MEMITConfig to spread an edit "
                "over several layers."
            )

    def default_layers(self, layout):
        return layout.default_layers(fraction=0.17, count=1)
