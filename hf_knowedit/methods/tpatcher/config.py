import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...config import EditConfig
from ...errors import EditConfigError


@dataclass
class TPatcherConfig(EditConfig):
    """Transformer-Patcher (Huang et al. 2023, "Transformer-Patcher: One Mistake Worth One Neuron"): for each edit,
    a few neurons (patches) added beside the FFN of the last block, `FFN'(x) = FFN(x) + relu(x·k + b) v`.

    Each patch is trained (Eq. 6 of the paper) with the edit loss (the target's likelihood with the patch on), an
    activation loss that makes it fire on the edit's input (the FFN input at the prompt's last token, or at the first
    decoder position of an encoder-decoder) and a memory loss that keeps it silent on every position of out-of-scope
    prompts: the requests' locality prompts, the other requests' prompts, the edit prompt's own earlier positions and
    `memory_prompts`. Both are written as hinges on the patch's score `x·k + b` (`relu(margin - score)` for the edit,
    `relu(score + margin)` for the memory), in units where the initial key gives the edit input a score of 1. Where no
    patch fires, the model's output is unchanged bit for bit.

    Args:
        layers (`list[int]`, *optional*, defaults to `None`):
            The block whose FFN gets the patches; `None` takes the last block, as in the paper.
        neurons_per_edit (`int`, *optional*, defaults to `1`):
            Patches added per request.
        num_steps (`int`, *optional*, defaults to `60`):
            Optimisation steps per request.
        lr (`float`, *optional*, defaults to `1e-2`):
            Adam learning rate.
        activation_weight (`float`, *optional*, defaults to `1.0`):
            Weight `a` of the activation loss.
        memory_weight (`float`, *optional*, defaults to `1.0`):
            Weight `m` of the memory loss.
        margin (`float`, *optional*, defaults to `0.1`):
            Score margin of both hinges.
        memory_prompts (`list[str]`, *optional*, defaults to `None`):
            Out-of-scope prompts on which patches must stay silent; `None` uses a few generic sentences.
        memory_file (`str`, *optional*, defaults to `None`):
            An edit dataset file (any file :func:`~hf_knowedit.load_edit_dataset` reads, e.g. a train split) whose
            first `memory_records` records give memory prompts too: each record's edit prompt and locality prompts.
            This is the paper's memory set, sampled from training data; it is never the data an edit is scored on.
        memory_records (`int`, *optional*, defaults to `64`):
            Records of `memory_file` used.
        memory_top_k (`int`, *optional*, defaults to `None`):
            Average the memory hinge over each patch's `memory_top_k` highest-scoring memory inputs only. `None`
            averages it over all of them, as in the paper; with a large memory set (thousands of positions, most of
            them far from the edit) that mean hardly pulls the key away from the few out-of-scope inputs that score
            close to the edit, such as prompts of the same relation.
        max_value_scale (`float`, *optional*, defaults to `None`):
            After training, each patch's threshold is raised above every memory input's score (halfway between the
            closest one and the edit input) and its value scaled up to keep its output on the edit input. When that
            factor would exceed `max_value_scale`, the threshold is raised only as far as this factor allows, and
            the patch may still fire weakly on the closest memory inputs: a large factor makes any unseen input just
            past the threshold get a large output. `None` silences the memory whatever the factor.
        key_init (`str`, *optional*, defaults to `"edit_input"`):
            The key a patch starts from. `"edit_input"` (the paper's): the edit input itself. In a model whose FFN
            inputs share a large common component (SmolLM2's last block: a memory input scores a median 0.8 of the
            edit input's own score), that key scores memory inputs of the same relation above the edit input, and
            training may never separate them. `"max_margin"`: the direction that best separates the edit input from
            every memory input (the largest smallest gap, found by a few hundred steps of gradient descent on a
            smoothed maximum), so that the patch starts out silent on the whole memory set.
        train_key (`bool`, *optional*, defaults to `True`):
            Train the key along with the bias and the value (the paper's). With `False` the key stays as it starts
            and only the bias (the threshold) and the value are trained: the edit loss, which pulls a trained key
            towards the direction all FFN inputs share, then cannot undo the separation a `"max_margin"` key starts
            with. Pair it with a `key_scale` of tens: a fixed key cannot grow, and with the initial key's scale the
            patch's output stays too small for 60 steps of its value to write the target.
        key_scale (`float`, *optional*, defaults to `1.0`):
            The score the initial key gives the edit input (its bias scaled alike, so the threshold is unchanged).
            The hinges are measured in units of the key and do not depend on it; the edit loss does, as the patch's
            output is its activation times its value.
        max_memory_fire_rate (`float`, *optional*, defaults to `0.5`):
            Refuse an edit (`EditFailedError`, the model left unchanged) when one of its patches, once trained and
            silenced, still fires on more than this share of its memory inputs: its edit input does not out-score
            them, and the patch would fire on most unrelated prompts. `1.0` accepts every patch.
    """

    edit_type: ClassVar[str] = "tpatcher"

    neurons_per_edit: int = field(default=1, metadata={"help": "Patches per request."})
    num_steps: int = field(default=60, metadata={"help": "Optimisation steps per request."})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate."})
    activation_weight: float = field(default=1.0, metadata={"help": "Weight of the activation loss."})
    memory_weight: float = field(default=1.0, metadata={"help": "Weight of the memory loss."})
    margin: float = field(default=0.1, metadata={"help": "Score margin of the activation and memory hinges."})
    memory_prompts: list[str] | None = field(
        default=None, metadata={"help": "Out-of-scope prompts; None uses a few generic sentences."}
    )
    memory_file: str | None = field(
        default=None, metadata={"help": "Edit dataset (e.g. a train split) whose first records give memory prompts."}
    )
    memory_records: int = field(default=64, metadata={"help": "Records of memory_file used."})
    memory_top_k: int | None = field(
        default=None, metadata={"help": "Memory inputs per patch in the memory hinge (highest scores); None: all."}
    )
    max_value_scale: float | None = field(
        default=None, metadata={"help": "Largest factor a patch's value is scaled by when silenced; None: no cap."}
    )

    key_init: str = field(default="edit_input", metadata={"help": "Initial key: edit_input or max_margin."})
    train_key: bool = field(default=True, metadata={"help": "Train the key too (False: only bias and value)."})
    key_scale: float = field(default=1.0, metadata={"help": "The edit input's score under the initial key."})
    max_memory_fire_rate: float = field(
        default=0.5, metadata={"help": "Refuse a patch firing on more than this share of its memory inputs."}
    )

    KEY_INITS: ClassVar[tuple[str, ...]] = ("edit_input", "max_margin")

    def __post_init__(self):
        super().__post_init__()
        if self.key_init not in self.KEY_INITS:
            raise EditConfigError(f"TPatcherConfig.key_init must be one of {self.KEY_INITS}, got {self.key_init!r}.")
        if not (isinstance(self.key_scale, (int, float)) and not isinstance(self.key_scale, bool)
                and math.isfinite(self.key_scale) and self.key_scale > 0):
            raise EditConfigError(f"TPatcherConfig.key_scale must be a finite number > 0, got {self.key_scale!r}.")
        if not isinstance(self.train_key, bool):
            raise EditConfigError(f"TPatcherConfig.train_key must be true or false, got {self.train_key!r}.")
        rate = self.max_memory_fire_rate
        if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate <= 1):
            raise EditConfigError(f"TPatcherConfig.max_memory_fire_rate must be a number in [0, 1], got {rate!r}.")
        if self.layers is not None and len(self.layers) != 1:
            raise EditConfigError(f"TPatcherConfig.layers must name one block, got {self.layers}.")
        for name in ("neurons_per_edit", "num_steps", "memory_records", "memory_top_k"):
            value = getattr(self, name)
            if name == "memory_top_k" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EditConfigError(f"TPatcherConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("lr", "activation_weight", "memory_weight", "margin"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)) or (
                name == "lr" and value == 0
            ):
                raise EditConfigError(f"TPatcherConfig.{name} must be a finite number >= 0 (lr > 0), got {value!r}.")
        if self.max_value_scale is not None and not (
            isinstance(self.max_value_scale, (int, float)) and not isinstance(self.max_value_scale, bool)
            and math.isfinite(self.max_value_scale) and self.max_value_scale >= 1
        ):
            raise EditConfigError(f"TPatcherConfig.max_value_scale must be a finite number >= 1 or None, got "
                                  f"{self.max_value_scale!r}.")
        if self.memory_prompts is not None and not all(isinstance(p, str) and p.strip() for p in self.memory_prompts):
            raise EditConfigError("TPatcherConfig.memory_prompts must be a list of non-empty strings.")
        if self.memory_file is not None and not (isinstance(self.memory_file, str) and self.memory_file.strip()):
            raise EditConfigError(f"TPatcherConfig.memory_file must be a path or None, got {self.memory_file!r}.")

    def default_layers(self, layout):
        return [layout.num_layers - 1]
