import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...config import EditConfig
from ...errors import EditConfigError


@dataclass
class GRACEConfig(EditConfig):
    """GRACE (Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors"):
    a codebook of keys, values and deferral radii at one block; the weights are never touched.

    At every position, the block's output hidden state `h` is looked up: if the nearest key `k_i` lies within its
    radius, `‖h - k_i‖ ≤ ε_i`, the output there is replaced by the value `v_i`; elsewhere it is left exactly as it
    was. An edit's key is the block output at the prompt's last token (decoder-only models) or at the first decoder
    position (encoder-decoders), so the replacement happens where the prompt ends and every later token (the target,
    generated text) reads it through attention: the same rule serves teacher forcing and generation. Values are
    trained to make the target likely. New keys join the codebook by the paper's rules: a new entry when no ball is
    near (`d > ε_new + ε_i`), otherwise the nearest ball *expands* to `d` for the same target, or, for a conflicting
    target, both balls *split* to radius `d / 2`.

    Args:
        layers (`list[int]`, *optional*, defaults to `None`):
            The one block whose output holds the codebook; `None` takes the block at three quarters of the depth.
        initial_radius (`float`, *optional*, defaults to `0.1`):
            The deferral radius ε of a new key, relative to the key's norm (`ε = initial_radius · ‖k‖`), so the same
            value fits models whose hidden states differ in scale.
        num_steps (`int`, *optional*, defaults to `100`):
            Optimisation steps of each value.
        lr (`float`, *optional*, defaults to `0.5`):
            Adam learning rate of the values.
        stop_loss (`float`, *optional*, defaults to `0.01`):
            Stop training a value once the target's loss is below this.
    """

    edit_type: ClassVar[str] = "grace"

    initial_radius: float = field(default=0.1, metadata={"help": "Radius of a new key, relative to the key's norm."})
    num_steps: int = field(default=100, metadata={"help": "Optimisation steps per value."})
    lr: float = field(default=0.5, metadata={"help": "Adam learning rate of the values."})
    stop_loss: float = field(default=0.01, metadata={"help": "Stop once the target loss is below this."})

    def __post_init__(self):
        super().__post_init__()
        if self.layers is not None and len(self.layers) != 1:
            raise EditConfigError(f"GRACEConfig.layers must name one block, got {self.layers}.")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise EditConfigError(f"GRACEConfig.num_steps must be a positive integer, got {self.num_steps!r}.")
        for name in ("initial_radius", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise EditConfigError(f"GRACEConfig.{name} must be a positive finite number, got {value!r}.")

    def default_layers(self, layout):
        return [min(layout.num_layers - 1, int(layout.num_layers * 0.75))]
