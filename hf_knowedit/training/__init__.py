"""Training learned editors (MEND, KE, SERAC, ...) with one loop, one checkpoint format and one artifact format.

How a method plugs in:

1. Write a :class:`TrainableEditorSpec` subclass for the method's config class. `SpecClass(config, model, tokenizer)`
   is made for one base model; it implements

   - `build_trainable() -> nn.Module`: a fresh editor network (its `state_dict` is the saved editor);
   - `training_loss(trainable, requests) -> (loss, metrics)`: the loss on a batch of
     :class:`~hf_knowedit.EditRequest` and a dict of float metrics;

   and may override `edited_module_paths()` (the base modules it writes: fingerprinted, and the "layer set" an
   artifact is refused for), `parameter_groups(trainable, lr)`, `validation_metrics(trainable, requests)`,
   `check_training_requests(requests, batch_size)` and the class defaults `default_learning_rate`,
   `default_batch_size`.
2. Register it in the method's `__init__.py`: `register_trainable_editor("mend", MENDTrainingSpec)`.
3. Give the method's config an `editor` field (a directory or Hub repo id, or `"untrained"`), and in the editor call
   :func:`load_editor_for(config, model, tokenizer) <load_editor_for>`, which returns `(spec, trainable)` with the
   trained weights loaded after checking the base model and layer set (:class:`~hf_knowedit.BaseModelMismatchError`).

Then :func:`train_editor` and `hf-knowedit train-editor --method NAME` train it: `accelerate` for devices and processes,
a deterministic data order, validation on held-back requests, checkpoints in safetensors + JSON (never pickle),
resume, step and time budgets, and a stop with status `"diverged"` when a loss or gradient becomes NaN.

Shared pieces for gradient-based editors (MEND, KE) are in :mod:`hf_knowedit.training.gradients`: the layer inputs
`u` and output gradients `δ` of the edit loss, differentiable low-rank updates, and the edit and locality losses.

>>> from hf_knowedit.training import train_editor, TrainedEditor, register_trainable_editor
"""

from .artifact import UNTRAINED, TrainedEditor, editor_directory, editor_identity, load_editor_for
from .spec import TRAINABLE_EDITORS, TrainableEditorSpec, get_trainable_editor, register_trainable_editor
from .trainer import EditorTrainingArguments, TrainingResult, latest_checkpoint, train_editor


__all__ = [
    "TRAINABLE_EDITORS",
    "UNTRAINED",
    "EditorTrainingArguments",
    "TrainableEditorSpec",
    "TrainedEditor",
    "TrainingResult",
    "editor_directory",
    "editor_identity",
    "get_trainable_editor",
    "latest_checkpoint",
    "load_editor_for",
    "register_trainable_editor",
    "train_editor",
]
