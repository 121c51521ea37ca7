"""What the gradient-based learned editors (MEND, KE) share: config fields, their checks, and which weights they edit.

Both read the gradient of an edit's NLL at the MLP weights of a few blocks and turn it into a low-rank update with a
trained network; both are trained with `c_edit · NLL(target_new | rephrase) + c_loc · KL(locality)`.
"""

import math
from dataclasses import dataclass, field

from ..architectures import linear_shape
from ..config import EditConfig
from ..errors import EditConfigError
from .gradients import check_locality_available, mlp_module_paths
from .spec import TrainableEditorSpec


TARGET_MODULES = ("mlp_out", "mlp_in_out")


@dataclass
class GradientEditorConfig(EditConfig):
    """Fields shared by MEND and KE (documented in their configs): `editor`, `target_modules`, `c_edit`, `c_loc`."""

    editor: str | None = field(default=None, metadata={"help": "Trained editor (path or repo id) or 'untrained'."})
    target_modules: str = field(default="mlp_out", metadata={"help": f"One of {TARGET_MODULES}."})
    c_edit: float = field(default=0.1, metadata={"help": "Weight of the edit loss in training."})
    c_loc: float = field(default=1.0, metadata={"help": "Weight of the locality loss in training."})

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.target_modules not in TARGET_MODULES:
            raise EditConfigError(
                f"{name}.target_modules must be one of {TARGET_MODULES}, got {self.target_modules!r}."
            )
        self.check_non_negative("c_edit", "c_loc")
        if self.editor is not None and (not isinstance(self.editor, str) or not self.editor.strip()):
            raise EditConfigError(f"{name}.editor must be a path, a Hub repo id or 'untrained', got {self.editor!r}.")

    def check_non_negative(self, *names: str) -> None:
        """Raise :class:`EditConfigError` unless each named field is a finite number >= 0."""
        for field_name in names:
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise EditConfigError(
                    f"{type(self).__name__}.{field_name} must be a finite non-negative number, got {value!r}."
                )

    def default_layers(self, layout):
        """The last three blocks, as MEND edits."""
        return layout.default_layers(fraction=1.0, count=3)


class GradientEditorSpec(TrainableEditorSpec):
    """Training spec of a :class:`GradientEditorConfig` method: which weights it edits, and requests with locality."""

    default_learning_rate = 1e-4
    default_batch_size = 8

    def edited_module_paths(self) -> list[str]:
        return mlp_module_paths(self.layout, self.config.resolve_layers(self.layout), self.config.target_modules)

    def edited_shapes(self) -> list[tuple[int, int]]:
        """`(out, in)` of each edited weight, in the order of :meth:`edited_module_paths`."""
        return [linear_shape(self.model.get_submodule(path)) for path in self.edited_module_paths()]

    def check_training_requests(self, requests, batch_size):
        check_locality_available(requests, batch_size)
