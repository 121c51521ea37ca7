from dataclasses import dataclass, field
from typing import ClassVar

from ...errors import EditConfigError
from ...training.gradient_editor import GradientEditorConfig


@dataclass
class KEConfig(GradientEditorConfig):
    """KnowledgeEditor (KE; De Cao et al. 2021, "Editing Factual Knowledge in Language Models"): a hypernetwork reads
    the fact to write and predicts, from the gradient of the edit, a constrained update of each edited weight.

    For a weight `W` (`out × in`) and the gradient `∇W = Σ_t δ_t u_tᵀ` of the edit's NLL, the update is
    `ΔW = −s · σ(η) · (α̂ ⊙ ∇W + β̂)` with `α̂ = σ(α) γᵀ` and `β̂ = σ(β) dᵀ` (§3, "constrained update"), where
    `α, β ∈ R^out`, `γ, d ∈ R^in` and `η` are predicted from an encoding `h` of the fact (a bidirectional LSTM over the
    base model's token embeddings of the prompt and `target_new`, as in the paper). Because `α̂ ⊙ (δ uᵀ) = (σ(α) ⊙
    δ)(γ ⊙ u)ᵀ`, the update is low-rank: one factor per token plus one.

    Args:
        editor (`str`, *optional*, defaults to `None`):
            The trained editor: a directory or Hub repo id written by `hf-knowedit train-editor --method ke` (the
            run's output folder works too), or `"untrained"` for the freshly initialised hypernetwork (a baseline).
        layers (`list[int]`, *optional*, defaults to `None`):
            Blocks whose MLP weights are edited; `None` takes the last three blocks. With a trained editor, `None`
            uses the trained layers, and other layers are refused.
        target_modules (`str`, *optional*, defaults to `"mlp_out"`):
            `"mlp_out"` or `"mlp_in_out"` (the MLP input projections too).
        condition_size (`int`, *optional*, defaults to `128`):
            Hidden size of each direction of the LSTM that encodes the fact.
        edit_scale (`float`, *optional*, defaults to `1.0`):
            `s`, the largest step the update can take (`σ(η) ≤ 1` scales it).
        c_edit (`float`, *optional*, defaults to `0.1`):
            Weight of the edit loss (NLL of `target_new` on the rephrased prompt after the edit) in training.
        c_loc (`float`, *optional*, defaults to `1.0`):
            Weight of the locality loss (KL between the base and edited model on locality prompts): the paper's
            constraint that other predictions do not change, as a penalty.
    """

    edit_type: ClassVar[str] = "ke"

    condition_size: int = field(default=128, metadata={"help": "LSTM hidden size per direction."})
    edit_scale: float = field(default=1.0, metadata={"help": "Largest step of the update."})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.condition_size, int) or isinstance(self.condition_size, bool) or self.condition_size < 1:
            raise EditConfigError(f"KEConfig.condition_size must be a positive integer, got {self.condition_size!r}.")
        self.check_non_negative("edit_scale")
