import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...config import EditConfig
from ...errors import EditConfigError


MODES = ("edit", "erase")


@dataclass
class KNConfig(EditConfig):
    """Knowledge Neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers"): find the MLP neurons whose
    integrated-gradients attribution to the known answer is high, then rewrite their value vectors.

    The neurons are the input units of each block's MLP output projection; the value vector of neuron `i` is column
    `i` of that projection's weight `(out, in)`. The edit moves each value vector along `E[target_new] − E[old]`, with
    `E` the rows of the output embedding (as EasyEdit's KN does), or zeroes it (`mode="erase"`).

    Args:
        layers (`list[int]`, *optional*, defaults to `None`):
            Blocks whose neurons are attributed; `None` takes every block, as the paper does.
        steps (`int`, *optional*, defaults to `20`):
            Riemann steps of the integrated gradients, the activation scaled from `1/steps` to 1 (one batch).
        attribution_threshold (`float`, *optional*, defaults to `0.2`):
            A neuron is kept for a prompt when its attribution exceeds this fraction of the largest attribution.
        refinement_share (`float`, *optional*, defaults to `0.5`):
            With several prompts (the edit prompt and its rephrases), keep the neurons kept for at least this share
            of them (the paper's refinement `p`); `0` keeps the union.
        max_neurons (`int`, *optional*, defaults to `None`):
            Keep at most this many neurons per request (the most attributed); `None` keeps all selected.
        layers_per_pass (`int`, *optional*, defaults to `8`):
            Layers attributed in one batched pass of `steps × layers_per_pass` copies of the prompt's last token
            (`None`: every layer in one pass). The attributions are the same either way (up to float rounding); the
            memory grows with it, the speed hardly past 8 (`benchmarks/bench_kn.py --n 2 --layers-per-pass
            all,10,8,1`, default model, one CPU thread: 8 and 10 layers per pass 2.9x and 3.1x faster than 1, all 30
            2.4x, for a tensor peak of 441, 550 and 1,645 MB against 58 MB).
        edit_strength (`float`, *optional*, defaults to `2.0`):
            `λ` of `v_i += λ (E[target_new] − E[old])` (EasyEdit uses 2).
        mode (`str`, *optional*, defaults to `"edit"`):
            `"edit"` writes `target_new` as above, with `old` the first token of `target_true`, or the model's current
            top prediction when the request has no `target_true`; `"erase"` zeroes the value vectors (the paper's
            erasing experiment).
    """

    edit_type: ClassVar[str] = "kn"

    steps: int = field(default=20, metadata={"help": "Integrated-gradients steps."})
    attribution_threshold: float = field(default=0.2, metadata={"help": "Fraction of the largest attribution kept."})
    refinement_share: float = field(default=0.5, metadata={"help": "Share of prompts a neuron must be kept for."})
    max_neurons: int | None = field(default=None, metadata={"help": "Most neurons edited per request."})
    layers_per_pass: int | None = field(default=8, metadata={"help": "Layers per attribution pass (None: all)."})
    edit_strength: float = field(default=2.0, metadata={"help": "λ of v_i += λ (E[new] - E[old])."})
    mode: str = field(default="edit", metadata={"help": f"One of {MODES}."})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise EditConfigError(f"KNConfig.steps must be a positive integer, got {self.steps!r}.")
        if not 0 < self.attribution_threshold <= 1:
            raise EditConfigError(
                f"KNConfig.attribution_threshold must be in (0, 1], got {self.attribution_threshold!r}."
            )
        if not 0 <= self.refinement_share <= 1:
            raise EditConfigError(f"KNConfig.refinement_share must be in [0, 1], got {self.refinement_share!r}.")
        if self.max_neurons is not None and (not isinstance(self.max_neurons, int) or self.max_neurons < 1):
            raise EditConfigError(f"KNConfig.max_neurons must be a positive integer or None, got {self.max_neurons!r}.")
        if self.layers_per_pass is not None and (not isinstance(self.layers_per_pass, int)
                                                 or isinstance(self.layers_per_pass, bool) or self.layers_per_pass < 1):
            raise EditConfigError(
                f"KNConfig.layers_per_pass must be a positive integer or None, got {self.layers_per_pass!r}."
            )
        if not math.isfinite(self.edit_strength):
            raise EditConfigError(f"KNConfig.edit_strength must be finite, got {self.edit_strength!r}.")
        if self.mode not in MODES:
            raise EditConfigError(f"KNConfig.mode must be one of {MODES}, got {self.mode!r}.")

    @property
    def raises_target_new(self) -> bool:
        return self.mode == "edit"  # erasing zeroes the knowledge neurons; it does not aim at target_new

    def default_layers(self, layout):
        return list(range(layout.num_layers))
