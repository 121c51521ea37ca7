import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...config import EditConfig
from ...errors import EditConfigError


@dataclass
class SERACConfig(EditConfig):
    """SERAC (Mitchell et al. 2022, "Memory-Based Model Editing at Scale"): the edits are kept in an explicit memory
    beside the model; a scope classifier decides, prompt by prompt, whether an input falls under a stored edit, and if
    so a counterfactual model answers it; otherwise the base model answers, exactly as before.

    How it is built here:

    - **Edit memory.** One entry per request: its edit prompt, subject and new target (JSON, in the artifact's
      config) and the *scope embedding* of its edit prompt (a tensor, in the artifact's safetensors). Sequential edits
      append to the memory; nothing is retrained.
    - **Scope classifier** (the paper's embedding variant, `SERAC-Emb`). Features are the hidden states of the base
      model after block `layers[0]` (the encoder's block for encoder-decoders), each token's vector scaled to unit
      norm, then mean-pooled over the prompt; they are computed with every edit switched off, so earlier edits do not
      move them. A trainable affine projection, initialised to the identity, maps the features (minus their mean over
      the training data) to an embedding; the classifier's score of an input against an entry is the cosine
      similarity of their embeddings. An input is in scope when its best score exceeds a threshold, trained with the
      projection: the pair logit is `scale · (cos - threshold)`. Training (`hf-knowedit train-editor --method
      serac`) minimises a class-balanced binary cross-entropy over the pairs of a batch: (edit, its edit prompt and
      its rephrases) are in scope, (edit, its locality prompts and the other requests' prompts) are out of scope,
      the locality prompts (hard negatives: same relation, another subject) weighted as a class of their own;
      every input is also seen with the new target appended, as scoring by teacher forcing feeds the model
      `prompt + target`. The entry's key is its edit prompt without the target (the paper embeds the whole edit
      descriptor): a key holding the new target would favour inputs ending in that target over the same prompt with
      another candidate answer.
    - **Counterfactual model.** An in-scope prompt is answered by the *frozen base model* with the retrieved edit in
      context, `"New Fact: <edit prompt> <new target>\\n"` put before the prompt (IKE's format). The paper trains a
      separate small seq2seq or causal model on (edit, input) pairs; here nothing of the base model is trained, and
      the edit is only in the context. Out-of-scope prompts reach the base model unchanged, bit for bit.

    The edit artifact is self-contained: it stores the classifier's tensors (projection, feature mean) and the
    threshold next to the memory, so it needs neither the trained editor nor its directory to be reloaded.

    Args:
        editor (`str`, *optional*, defaults to `None`):
            The trained scope classifier: a directory or Hub repo id written by `hf-knowedit train-editor --method
            serac` (the run's output folder works too), or `"untrained"` for the identity projection with
            `init_threshold` (a baseline, and for tests). `None` raises an error that says how to train one.
        layers (`list[int]`, *optional*, defaults to `None`):
            The one block whose output hidden states are the classifier's features; `None` takes the middle block.
            With a trained classifier, `None` uses the trained block, and another block is refused.
        threshold (`float`, *optional*, defaults to `None`):
            Cosine similarity above which an input is in scope; `None` uses the classifier's (trained) threshold. The
            value used is stored in the edit.
        init_threshold (`float`, *optional*, defaults to `0.75`):
            The threshold of a fresh classifier (the untrained one uses it as is; training starts from it).
        init_scale (`float`, *optional*, defaults to `10.0`):
            The initial scale of the pair logits, `scale · (cos - threshold)`; trained with the projection.
        augment_with_target (`bool`, *optional*, defaults to `True`):
            In training, also show every input with the edit's new target appended.
    """

    edit_type: ClassVar[str] = "serac"

    editor: str | None = field(
        default=None, metadata={"help": "Trained scope classifier (path or repo id) or 'untrained'."}
    )
    threshold: float | None = field(
        default=None, metadata={"help": "In-scope cosine threshold; None: the classifier's trained threshold."}
    )
    init_threshold: float = field(default=0.75, metadata={"help": "Threshold of a fresh (untrained) classifier."})
    init_scale: float = field(default=10.0, metadata={"help": "Initial scale of the pair logits."})
    augment_with_target: bool = field(
        default=True, metadata={"help": "Train on inputs with the new target appended too."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.layers is not None and len(self.layers) != 1:
            raise EditConfigError(f"SERACConfig.layers must name one block (the feature layer), got {self.layers}.")
        if self.editor is not None and (not isinstance(self.editor, str) or not self.editor.strip()):
            raise EditConfigError(
                f"SERACConfig.editor must be a path, a Hub repo id or 'untrained', got {self.editor!r}."
            )
        for name in ("threshold", "init_threshold"):
            value = getattr(self, name)
            if value is None and name == "threshold":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1.0 <= value <= 1.0:
                allowed = "a cosine similarity in [-1, 1]" + (" or None" if name == "threshold" else "")
                raise EditConfigError(f"SERACConfig.{name} must be {allowed}, got {value!r}.")
        if not (isinstance(self.init_scale, (int, float)) and math.isfinite(self.init_scale) and self.init_scale > 0):
            raise EditConfigError(f"SERACConfig.init_scale must be a positive finite number, got {self.init_scale!r}.")
        if not isinstance(self.augment_with_target, bool):
            raise EditConfigError(
                f"SERACConfig.augment_with_target must be true or false, got {self.augment_with_target!r}."
            )

    def default_layers(self, layout):
        return [layout.num_layers // 2]
