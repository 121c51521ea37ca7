"""The interface every editing method implements."""

from typing import ClassVar

from .config import EditConfig
from .deltas import EditComponent
from .errors import EditConfigError
from .requests import EditRequest


class BaseEditor:
    """Computes the components of an edit for a batch of requests.

    An editor receives the :class:`~hf_knowedit.EditedModel` with its current edits active (so sequential edits see
    the earlier ones) and returns `{module path: component}`. It must not change the model's weights: the
    `EditedModel` installs the components only once the editor has returned, so a failure leaves the model as it was.

    Subclasses set `config_class` and implement :meth:`compute_components`.
    """

    config_class: ClassVar[type[EditConfig]] = EditConfig

    def __init__(self, config: EditConfig):
        if not isinstance(config, self.config_class):
            raise EditConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got a {type(config).__name__} "
                f"(edit_type {getattr(config, 'edit_type', None)!r}). Use the config class of the method you want."
            )
        self.config = config
        self.stats: dict = {}  # figures of the last run (steps, losses, ...), recorded in the edit's metadata

    def check_model(self, edited_model) -> None:
        """Raise when the method cannot edit this model (e.g. an encoder-decoder for ROME). Default: any model."""

    def compute_components(self, edited_model, requests: list[EditRequest]) -> dict[str, EditComponent]:
        raise NotImplementedError

    @classmethod
    def stream_state(cls, edited_model, edit_name: str) -> tuple[dict, dict]:
        """What the method keeps between the calls of a sequential stream outside the edit `edit_name` itself, as
        `(tensors, JSON metadata)` for :meth:`restore_stream_state`. The evaluation harness saves it with the edit at
        each checkpoint of a sequential run, so that a stopped run resumes from the snapshot exactly as if it had not
        stopped. Default: nothing (the edit's components and requests are the whole state)."""
        return {}, {}

    @classmethod
    def restore_stream_state(cls, edited_model, edit_name: str, tensors: dict, meta: dict) -> None:
        """Take back the state :meth:`stream_state` returned, for the edit `edit_name` just loaded from disk."""
