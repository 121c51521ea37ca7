"""What a trainable editor is: :class:`TrainableEditorSpec`, and the registry of methods that have one."""

from typing import ClassVar

import torch
from torch import nn

from ..architectures import resolve_layout
from ..config import EditConfig
from ..devices import materialized_weight
from ..errors import EditConfigError
from ..requests import EditRequest


TRAINABLE_EDITORS: dict[str, type["TrainableEditorSpec"]] = {}


class TrainableEditorSpec:
    """How one method's editor network is built, trained, validated and tied to its base model.

    A spec is made for one base model and one method config: `spec = SpecClass(config, model, tokenizer)`. The
    training loop (:func:`~hf_knowedit.training.train_editor`) owns the optimizer, the data order, checkpoints and
    devices; the spec only says what to train and what the loss is.

    Subclasses set `config_class` and implement :meth:`build_trainable` and :meth:`training_loss`; they override
    :meth:`edited_module_paths` (the base modules the editor writes, fingerprinted in the artifact) and, if needed,
    :meth:`parameter_groups`, :meth:`validation_metrics` and :meth:`check_training_requests`.

    Class attributes:
        config_class (`type[EditConfig]`): the method's config.
        default_learning_rate (`float`): the Adam learning rate used when the training arguments give none.
        default_batch_size (`int`): requests per training step when the training arguments give none.
    """

    config_class: ClassVar[type[EditConfig]] = EditConfig
    default_learning_rate: ClassVar[float] = 1e-4
    default_batch_size: ClassVar[int] = 8

    def __init__(self, config: EditConfig, model: nn.Module, tokenizer):
        if not isinstance(config, self.config_class):
            raise EditConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got a {type(config).__name__}."
            )
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.layout = resolve_layout(model)

    # -- to implement ----------------------------------------------------------------------------------------------
    def build_trainable(self) -> nn.Module:
        """A fresh, untrained editor network (one `nn.Module`; its `state_dict` is what the artifact stores)."""
        raise NotImplementedError

    def training_loss(self, trainable: nn.Module, requests: list[EditRequest]) -> tuple[torch.Tensor, dict]:
        """The scalar loss to minimise on a batch of requests, and a dict of float metrics to log."""
        raise NotImplementedError

    # -- optional --------------------------------------------------------------------------------------------------
    def edited_module_paths(self) -> list[str]:
        """The base model's modules the editor changes; their weights are fingerprinted in the artifact."""
        return []

    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        """The base tensors an editor artifact is tied to: the weights of the edited modules, else the embedding."""
        paths = self.edited_module_paths() or [self.layout.embed_path]
        return {f"{path}.weight": materialized_weight(self.model.get_submodule(path)) for path in paths}

    def parameter_groups(self, trainable: nn.Module, learning_rate: float) -> list[dict]:
        """Optimizer parameter groups (override to give some parameters another learning rate)."""
        return [{"params": [p for p in trainable.parameters() if p.requires_grad], "lr": learning_rate}]

    def validation_metrics(self, trainable: nn.Module, requests: list[EditRequest]) -> dict[str, float]:
        """Metrics on held-back requests; by default the training metrics computed in eval mode."""
        was_training = trainable.training
        trainable.eval()
        try:
            loss, metrics = self.training_loss(trainable, requests)
        finally:
            trainable.train(was_training)
        return {"loss": float(loss.detach()), **metrics}

    def check_training_requests(self, requests: list[EditRequest], batch_size: int) -> None:
        """Raise :class:`~hf_knowedit.errors.EditRequestError` when the requests lack what the loss needs."""

    def artifact_metadata(self) -> dict:
        """JSON facts stored with a trained editor besides the config: the edited modules and the layer set."""
        layers = self.config.resolve_layers(self.layout) if hasattr(self.config, "resolve_layers") else None
        return {"edited_modules": self.edited_module_paths(), "layers": layers}


def register_trainable_editor(name: str, spec_cls: type[TrainableEditorSpec]) -> None:
    """Make the method `name` trainable with :func:`~hf_knowedit.training.train_editor` and `hf-knowedit train-editor`.

    Example:

    ```python
    >>> from hf_knowedit.training import TRAINABLE_EDITORS, register_trainable_editor
    >>> from hf_knowedit.methods.mend import MENDTrainingSpec
    >>> register_trainable_editor("mend", MENDTrainingSpec)  # what hf_knowedit.methods.mend does on import
    >>> "mend" in TRAINABLE_EDITORS
    True

    ```
    """
    if not (isinstance(spec_cls, type) and issubclass(spec_cls, TrainableEditorSpec)):
        raise TypeError(f"spec_cls must subclass TrainableEditorSpec, got {spec_cls!r}.")
    if spec_cls.config_class.edit_type != name:
        raise EditConfigError(
            f"{spec_cls.__name__}.config_class is for {spec_cls.config_class.edit_type!r}, registered as {name!r}."
        )
    TRAINABLE_EDITORS[name] = spec_cls


def get_trainable_editor(name: str) -> type[TrainableEditorSpec]:
    """The spec class registered for the method `name`."""
    if name not in TRAINABLE_EDITORS:
        raise EditConfigError(
            f"The method {name!r} has no trainable editor; trainable methods: {sorted(TRAINABLE_EDITORS)}. Register "
            "one with hf_knowedit.training.register_trainable_editor(name, SpecClass)."
        )
    return TRAINABLE_EDITORS[name]
