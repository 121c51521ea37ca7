import torch

from ...devices import input_device, materialized_weight
from ...edited_model import MODEL_ROOT
from ...editor import BaseEditor
from ...errors import EditRequestError
from ...training import TrainableEditorSpec, load_editor_for
from ..calinet.side_ffn import hidden_size
from .config import SERACConfig
from .memory import SERACMemory
from .scope import ScopeClassifier, pooled_features, roc_auc


MAX_CACHED_FEATURES = 50_000


class SERACTrainingSpec(TrainableEditorSpec):
    """How SERAC's scope classifier is trained (Mitchell et al. 2022, §3.2, embedding variant): on every batch, the
    cosine similarities between each request's edit prompt and every input of the batch are scored with
    `scale · (cos - threshold)` against binary labels: in scope for the request's own edit prompt and rephrases,
    out of scope for its locality prompts and for the other requests' prompts. The loss is the sum of the mean binary
    cross-entropies over in-scope pairs, over (request, own locality prompt) pairs, and over the other out-of-scope
    pairs (class-balanced, the hard negatives as a class of their own).

    The base model is frozen, so the features of a text are computed once and cached.
    """

    config_class = SERACConfig
    default_learning_rate = 1e-3
    default_batch_size = 16

    def __init__(self, config, model, tokenizer):
        super().__init__(config, model, tokenizer)
        (self.feature_layer,) = config.resolve_layers(self.layout)
        self._cache: dict[str, torch.Tensor] = {}

    def fingerprint_tensors(self):
        paths = [self.layout.embed_path, self.layout.mlp_out_path(min(self.feature_layer, self.layout.num_layers - 1))]
        return {f"{path}.weight": materialized_weight(self.model.get_submodule(path)) for path in paths}

    def build_trainable(self) -> ScopeClassifier:
        return ScopeClassifier(hidden_size(self.model), self.config.init_threshold, self.config.init_scale)

    def features(self, texts: list[str]) -> torch.Tensor:
        """Pooled features of `texts` (cached: the base model does not change during training)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        computed = {}
        if missing:
            features = pooled_features(self.model, self.tokenizer, self.layout, self.feature_layer, missing)
            computed = dict(zip(missing, features, strict=True))
        device = input_device(self.model)
        result = torch.stack([computed[t] if t in computed else self._cache[t].to(device) for t in texts])
        if len(self._cache) + len(computed) > MAX_CACHED_FEATURES:
            self._cache.clear()
        self._cache.update({t: v.cpu() for t, v in computed.items()})
        return result.to(device)

    def check_training_requests(self, requests, batch_size):
        if min(batch_size, len(requests)) < 2 and not any(r.locality for r in requests):
            raise EditRequestError(
                "SERAC's scope classifier needs out-of-scope inputs: give requests with locality prompts, or a "
                "batch_size of at least 2 (the other requests' prompts are out of scope)."
            )

    def scope_pairs(self, requests):
        """The inputs of a batch and their labels per request: `(texts, in_scope (B, M), own_locality (B, M))`.

        `in_scope[i, m]` says input `m` is request `i`'s edit prompt or a rephrase (with or without the new target);
        `own_locality[i, m]` marks request `i`'s own locality prompts, the hard out-of-scope inputs (same relation,
        another subject, in CounterFact).
        """
        def variants(prompt, request):
            return [prompt, f"{prompt} {request.target_new.strip()}"] if self.config.augment_with_target else [prompt]

        in_scope = [{v for p in [r.filled_prompt, *r.rephrase_prompts] for v in variants(p, r)} for r in requests]
        locality = [{v for probe in r.locality for v in variants(probe.prompt, r)} - scope
                    for r, scope in zip(requests, in_scope, strict=True)]
        texts = []
        for scope, local in zip(in_scope, locality, strict=True):
            texts.extend(sorted(scope) + sorted(local))
        texts = list(dict.fromkeys(texts))
        labels = torch.tensor([[text in scope for text in texts] for scope in in_scope], dtype=torch.bool)
        own_locality = torch.tensor([[text in local for text in texts] for local in locality], dtype=torch.bool)
        return texts, labels, own_locality & ~labels

    def similarities(self, trainable: ScopeClassifier, requests):
        texts, labels, own_locality = self.scope_pairs(requests)
        keys = trainable.embed(self.features([r.filled_prompt for r in requests]))
        inputs = trainable.embed(self.features(texts))
        return keys @ inputs.T, labels.to(keys.device), own_locality.to(keys.device)

    def training_loss(self, trainable, requests):
        similarities, labels, own_locality = self.similarities(trainable, requests)
        logits = trainable.pair_logits(similarities)
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
        # Class-balanced, with the hard negatives (the request's own locality prompts) weighted as a class of their
        # own: otherwise the many easy pairs with other requests' prompts would drown them.
        groups = [labels, own_locality, ~labels & ~own_locality]
        loss = sum(losses[group].mean() for group in groups if group.any())
        with torch.no_grad():
            decided = similarities > trainable.threshold
            accuracy = {name: float((decided[group] == expected).float().mean())
                        for name, group, expected in (("in_scope_accuracy", labels, True),
                                                      ("out_of_scope_accuracy", ~labels, False),
                                                      ("locality_accuracy", own_locality, False)) if group.any()}
            metrics = {**accuracy, "auc": roc_auc(similarities.detach().flatten(), labels.flatten()),
                       "threshold": float(trainable.threshold.detach())}
        return loss, metrics


class SERACEditor(BaseEditor):
    """Adds the requests to a SERAC edit memory, with their scope embeddings from the (trained) scope classifier; no
    weight of the model changes.

    >>> from hf_knowedit import get_edited_model, EditRequest
    >>> from hf_knowedit.methods.serac import SERACConfig
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> request = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
    >>> edited = get_edited_model(tiny_model("gpt2"), SERACConfig(editor="untrained"), [request],
    ...                           tokenizer=tiny_tokenizer())
    >>> memory = edited.get_edit().components[""][0]
    >>> memory.route(edited, ["The capital of Atlantis is", "Nobody expected the weather to"])
    ['New Fact: The capital of Atlantis is Paris\\n', None]
    """

    config_class = SERACConfig

    def compute_components(self, edited_model, requests):
        spec, classifier = load_editor_for(self.config, edited_model.base_model, edited_model.tokenizer)
        with edited_model.disable_edits():
            features = spec.features([r.filled_prompt for r in requests])
        with torch.no_grad():
            keys = classifier.eval().embed(features)
        threshold = self.config.threshold
        if threshold is None:
            threshold = float(classifier.threshold.detach())
        entries = [{"prompt": r.filled_prompt, "subject": r.subject, "target_new": r.target_new} for r in requests]
        self.stats = {"serac_threshold": threshold, "serac_layer": spec.feature_layer,
                      "serac_editor": self.config.editor}
        return {MODEL_ROOT: SERACMemory(classifier.cpu(), keys.cpu(), entries, spec.feature_layer, threshold)}
