import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...config import EditConfig
from ...errors import EditConfigError
from .side_ffn import ACTIVATIONS


@dataclass
class CaliNETConfig(EditConfig):
    """CaliNET (Dong et al. 2022, "Calibrating Factual Knowledge in Pretrained Language Models"): calibration memory
    slots, an FFN-like adapter of `num_slots` neurons added beside the FFN of chosen blocks,
    `FFN'(x) = FFN(x) + act(x Kᵀ + b) V`, trained on the edits' targets with the base model frozen.

    Args:
        layers (`list[int]`, *optional*, defaults to `None`):
            Blocks that get calibration slots; `None` takes the last block.
        num_slots (`int`, *optional*, defaults to `64`):
            Neurons (memory slots) per block and per edit call.
        activation (`str`, *optional*, defaults to `"relu"`):
            The slots' activation, `"relu"` or `"gelu"`.
        num_steps (`int`, *optional*, defaults to `50`):
            Optimisation steps over all requests.
        lr (`float`, *optional*, defaults to `1e-2`):
            Adam learning rate.
        init_scale (`float`, *optional*, defaults to `1.0`):
            Standard deviation of the keys at initialisation, in units of `1 / sqrt(hidden size)`; values start at 0,
            so the adapter starts as the identity.
        stop_loss (`float`, *optional*, defaults to `0.01`):
            Stop once the mean target loss is below this.
        requests_per_pass (`int`, *optional*, defaults to `128`):
            Requests in one forward and backward pass. A larger batch accumulates each step's gradient over passes of
            this many requests: the memory of the logits and activations follows this number, not the batch size,
            and the step is that of one pass over the whole batch up to float rounding. A batch of at most this many
            runs in one pass.
    """

    edit_type: ClassVar[str] = "calinet"

    num_slots: int = field(default=64, metadata={"help": "Calibration neurons per block and edit call."})
    activation: str = field(default="relu", metadata={"help": f"One of {ACTIVATIONS}."})
    num_steps: int = field(default=50, metadata={"help": "Optimisation steps."})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate."})
    init_scale: float = field(default=1.0, metadata={"help": "Key init std, in units of 1/sqrt(hidden)."})
    stop_loss: float = field(default=0.01, metadata={"help": "Stop once the mean target loss is below this."})
    requests_per_pass: int = field(
        default=128, metadata={"help": "Requests per forward and backward pass; larger batches accumulate gradients."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise EditConfigError(f"CaliNETConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        for name in ("num_slots", "num_steps", "requests_per_pass"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EditConfigError(f"CaliNETConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("lr", "init_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise EditConfigError(f"CaliNETConfig.{name} must be a positive finite number, got {value!r}.")

    def default_layers(self, layout):
        return [layout.num_layers - 1]
