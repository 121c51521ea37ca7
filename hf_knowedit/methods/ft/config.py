import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...config import EditConfig
from ...errors import EditConfigError


VARIANTS = ("ft_m", "ft_l")
OBJECTIVES = ("target_tokens", "prompt_last")
TARGET_MODULES = ("mlp_out", "mlp_in", "attn_out")


@dataclass
class FTConfig(EditConfig):
    """Fine-tuning (FT) edits: constrained fine-tuning of chosen weights on the edit prompts.

    Two variants users know: **FT-M** (EasyEdit's, the default), the cross-entropy of the target tokens with the
    prompt masked out; and **FT-L** (the FT+L baseline of Meng et al. 2022, "Locating and Editing Factual Associations
    in GPT", §4.2), the target's negative log-likelihood read at the prompt's last position, with the change of every
    weight bounded in L-infinity norm.

    Args:
        variant (`str`, *optional*, defaults to `"ft_m"`):
            `"ft_m"` or `"ft_l"`; sets the defaults of `objective` and `norm_constraint`.
        layers (`list[int]`, *optional*, defaults to `None`):
            Blocks whose weights are tuned; `None` takes one block at two thirds of the model's depth.
        target_module (`str`, *optional*, defaults to `"mlp_out"`):
            Which weights of each block: `"mlp_out"` (MLP output projection), `"mlp_in"` (its input projections) or
            `"attn_out"` (attention output projection).
        objective (`str`, *optional*, defaults to `None`):
            `"target_tokens"` (teacher-forced, masked to the target) or `"prompt_last"` (every target token predicted
            from the prompt's last position); `None` follows the variant.
        norm_constraint (`float`, *optional*, defaults to `None`):
            L-infinity bound on the change of each weight; `None` follows the variant (`5e-4` for FT-L, none for
            FT-M). `0` or a negative value means no bound.
        num_steps (`int`, *optional*, defaults to `25`):
            Optimisation steps over all requests.
        lr (`float`, *optional*, defaults to `5e-4`):
            Adam learning rate.
        weight_decay (`float`, *optional*, defaults to `0.0`):
            Adam weight decay on the change.
        batch_size (`int`, *optional*, defaults to `16`):
            Requests per optimisation batch when many are edited at once.
        stop_loss (`float`, *optional*, defaults to `0.01`):
            Stop early once the mean loss falls below this value.
    """

    edit_type: ClassVar[str] = "ft"

    variant: str = field(default="ft_m", metadata={"help": f"One of {VARIANTS}."})
    target_module: str = field(default="mlp_out", metadata={"help": f"One of {TARGET_MODULES}."})
    objective: str | None = field(default=None, metadata={"help": f"One of {OBJECTIVES}; None follows the variant."})
    norm_constraint: float | None = field(
        default=None, metadata={"help": "L-infinity bound on each weight's change; None follows the variant."}
    )
    num_steps: int = field(default=25, metadata={"help": "Optimisation steps."})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay."})
    batch_size: int = field(default=16, metadata={"help": "Requests per optimisation batch."})
    stop_loss: float = field(default=0.01, metadata={"help": "Stop once the mean loss is below this."})

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise EditConfigError(f"FTConfig.variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.target_module not in TARGET_MODULES:
            raise EditConfigError(
                f"FTConfig.target_module must be one of {TARGET_MODULES}, got {self.target_module!r}."
            )
        if self.objective is None:
            self.objective = "target_tokens" if self.variant == "ft_m" else "prompt_last"
        if self.objective not in OBJECTIVES:
            raise EditConfigError(f"FTConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.norm_constraint is None and self.variant == "ft_l":
            self.norm_constraint = 5e-4
        for name in ("num_steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise EditConfigError(f"FTConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EditConfigError(f"FTConfig.lr must be a positive finite number, got {self.lr!r}.")

    def default_layers(self, layout):
        return layout.default_layers(fraction=2 / 3)
