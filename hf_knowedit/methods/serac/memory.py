"""SERAC's artifact: the edit memory and its scope classifier, routing each prompt (a model-level component)."""

from typing import ClassVar

import torch

from ...deltas import register_component
from ...edited_model import ModelComponent
from ...errors import ArtifactError
from ..calinet.side_ffn import hidden_size
from ..ike.memory import fact_text
from .scope import ScopeClassifier, pooled_features


ENTRY_KEYS = ("prompt", "subject", "target_new")


def counterfactual_context(prompt: str, target: str) -> str:
    """What the counterfactual model sees before an in-scope prompt: `"New Fact: <prompt> <target>\\n"`."""
    return f"New Fact: {fact_text(prompt, target)}\n"


@register_component
class SERACMemory(ModelComponent):
    """The edits of a SERAC edit and the classifier that decides which prompts fall under them.

    A prompt whose best cosine similarity with the stored keys exceeds `threshold` gets the context of that entry
    (the latest among equals); the others are left to the base model.

    Args:
        classifier (`ScopeClassifier`): the (trained) projection and feature mean; copied and frozen.
        keys (`torch.Tensor`): `(n, hidden)` unit-norm scope embeddings of the entries' edit prompts.
        entries (`list[dict]`): per entry, its `prompt` (filled in), `subject` and `target_new`.
        layer (`int`): the block whose hidden states are the features.
        threshold (`float`): the in-scope cosine threshold.
    """

    kind: ClassVar[str] = "serac_memory"

    def __init__(self, classifier: ScopeClassifier, keys: torch.Tensor, entries: list[dict], layer: int,
                 threshold: float):
        super().__init__()
        if keys.dim() != 2 or keys.shape[1] != classifier.hidden_size:
            raise ValueError(f"SERAC keys must be (n, {classifier.hidden_size}), got {tuple(keys.shape)}.")
        if len(entries) != keys.shape[0]:
            raise ValueError(
                f"the SERAC memory has {len(entries)} entries but {keys.shape[0]} scope embeddings; it is truncated"
            )
        for entry in entries:
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ENTRY_KEYS):
                raise ValueError(f"a SERAC memory entry needs the strings {ENTRY_KEYS}, got {entry!r}")
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(f"the SERAC feature layer must be a block index, got {layer!r}")
        self.classifier = ScopeClassifier(classifier.hidden_size)
        self.classifier.load_state_dict(classifier.state_dict())
        self.classifier.requires_grad_(False).eval()
        self.register_buffer("keys", keys.detach().float().clone())
        self.entries = [{k: entry[k] for k in ENTRY_KEYS} for entry in entries]
        self.layer = layer
        self.threshold = float(threshold)

    def __len__(self) -> int:
        return len(self.entries)

    def context(self, index: int) -> str:
        entry = self.entries[index]
        return counterfactual_context(entry["prompt"], entry["target_new"])

    def scores(self, edited_model, prompts: list[str]) -> torch.Tensor:
        """`(len(prompts), n)` cosine similarities of the prompts with the entries, features taken unedited."""
        with edited_model.disable_edits():
            features = pooled_features(edited_model.base_model, edited_model.tokenizer, edited_model.layout,
                                       self.layer, prompts)
        with torch.no_grad():
            return self.classifier.embed(features.to(self.keys.device)) @ self.keys.T

    def match(self, edited_model, prompts: list[str]) -> list[int | None]:
        """For each prompt, the entry it falls under, or `None`."""
        if not self.entries or not prompts:
            return [None] * len(prompts)
        scores = self.scores(edited_model, prompts).flip(-1)  # flipped: the latest entry wins a tie
        best, index = scores.max(-1)
        last = len(self.entries) - 1
        return [last - int(i) if float(s) > self.threshold else None for s, i in zip(best, index, strict=True)]

    def route(self, edited_model, prompts):
        return [None if m is None else self.context(m) for m in self.match(edited_model, prompts)]

    def same_classifier(self, other: "SERACMemory") -> bool:
        mine, theirs = self.classifier.state_dict(), other.classifier.state_dict()
        return (self.layer == other.layer and self.threshold == other.threshold and mine.keys() == theirs.keys()
                and all(mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k].to(mine[k].device))
                        for k in mine))

    def combine(self, other):
        if isinstance(other, SERACMemory) and self.same_classifier(other):
            keys = torch.cat([self.keys, other.keys.to(self.keys.device)])
            return SERACMemory(self.classifier, keys, self.entries + other.entries, self.layer, self.threshold)
        return None

    def extra_meta(self):
        return {"entries": self.entries, "layer": self.layer, "threshold": self.threshold}

    def check_compatible(self, edited_model, path: str) -> None:
        model = edited_model.base_model
        expected = hidden_size(model)
        if self.classifier.hidden_size != expected:
            raise ArtifactError(
                f"The SERAC scope classifier at {path!r} reads {self.classifier.hidden_size}-dimensional features, but "
                f"the model's hidden size is {expected}: the edit was made for another model."
            )
        num_layers = edited_model.layout.num_layers
        if self.layer >= num_layers:
            raise ArtifactError(
                f"The SERAC memory reads the hidden states of block {self.layer}, but the model has {num_layers} "
                "blocks: the edit was made for another model."
            )

    @classmethod
    def from_state(cls, tensors, meta):
        for key in ("entries", "layer", "threshold"):
            if key not in meta:
                raise ValueError(f"the SERAC memory lacks its {key!r} metadata")
        weight = tensors.get("classifier.projection.weight")
        if weight is None or weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError("the SERAC memory lacks a square 'classifier.projection.weight'")
        classifier = ScopeClassifier(weight.shape[0])
        state = {k.removeprefix("classifier."): v for k, v in tensors.items() if k.startswith("classifier.")}
        try:
            classifier.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"the SERAC scope classifier's tensors do not fit together: {error}") from error
        if "keys" not in tensors:
            raise ValueError("the SERAC memory lacks its 'keys' tensor")
        if not isinstance(meta["entries"], list):
            raise ValueError("the SERAC memory's 'entries' is not a list")
        return cls(classifier, tensors["keys"], meta["entries"], meta["layer"], float(meta["threshold"]))
