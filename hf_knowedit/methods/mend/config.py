from dataclasses import dataclass, field
from typing import ClassVar

from ...errors import EditConfigError
from ...training.gradient_editor import GradientEditorConfig


@dataclass
class MENDConfig(GradientEditorConfig):
    """MEND (Mitchell et al. 2022, "Fast Model Editing at Scale"): a trained network maps the fine-tuning gradient
    of an edit, in its rank-one factors `(u, δ)`, to the weight update of each edited layer.

    Args:
        editor (`str`, *optional*, defaults to `None`):
            The trained editor: a directory or Hub repo id written by `hf-knowedit train-editor --method mend` (the
            run's output folder works too), or `"untrained"` for the freshly initialised network (a baseline). `None`
            raises an error that says how to train one.
        layers (`list[int]`, *optional*, defaults to `None`):
            Blocks whose MLP weights are edited; `None` takes the last three blocks, as MEND does. With a trained
            editor, `None` uses the trained layers, and other layers are refused.
        target_modules (`str`, *optional*, defaults to `"mlp_out"`):
            `"mlp_out"` (the MLP output projection) or `"mlp_in_out"` (its input projections too, as in the paper).
        rank (`int`, *optional*, defaults to `1920`):
            Rank of the low-rank hidden layers of the editor network (capped at its width, `in + out`).
        num_hidden (`int`, *optional*, defaults to `1`):
            Hidden layers of the editor network (each a residual low-rank layer with a ReLU).
        edit_lr (`float`, *optional*, defaults to `1e-4`):
            Initial value of the learned per-layer step size `η` of `ΔW = -η Σ_t δ̃_t ũ_tᵀ`.
        edit_lr_lr (`float`, *optional*, defaults to `1e-4`):
            Adam learning rate of the step sizes `η` during training.
        c_edit (`float`, *optional*, defaults to `0.1`):
            Weight of the edit loss (NLL of `target_new` on the rephrased prompt after the edit) in training.
        c_loc (`float`, *optional*, defaults to `1.0`):
            Weight of the locality loss (KL between the base and edited model on locality prompts) in training.
    """

    edit_type: ClassVar[str] = "mend"

    rank: int = field(default=1920, metadata={"help": "Rank of the editor network's hidden layers."})
    num_hidden: int = field(default=1, metadata={"help": "Hidden layers of the editor network."})
    edit_lr: float = field(default=1e-4, metadata={"help": "Initial per-layer step size of the update."})
    edit_lr_lr: float = field(default=1e-4, metadata={"help": "Learning rate of the step sizes in training."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("rank", "num_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "rank" else 0):
                raise EditConfigError(f"MENDConfig.{name} must be a {'positive' if name == 'rank' else 'non-negative'}"
                                      f" integer, got {value!r}.")
        self.check_non_negative("edit_lr", "edit_lr_lr")
