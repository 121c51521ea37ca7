"""SERAC's scope classifier, embedding variant (Mitchell et al. 2022, §3): frozen pooled features of the base model,
a trainable projection, and the cosine similarity between an input and each stored edit.

    features(x)  = mean over the tokens of x of  h_t / ‖h_t‖      (h_t: hidden state after the feature block)
    embed(x)     = normalise(W (features(x) - μ) + b)               (W = I, b = 0 at initialisation)
    score(e, x)  = embed(e) · embed(x)                              (cosine similarity)
    in scope     ⇔ max_e score(e, x) > threshold;   pair logit = scale · (score - threshold)
"""

import math

import torch
from torch import nn

from ...devices import input_device


class _FeaturesReady(Exception):
    """Raised by the hook on the feature block to stop the forward pass there."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def feature_block(model, layout, layer: int) -> nn.Module:
    """Block `layer` of a decoder-only model, or of an encoder-decoder's encoder (its first list of blocks)."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return model.get_submodule(layout.block_path(layer))
    blocks = next((m for m in model.get_encoder().modules() if isinstance(m, nn.ModuleList)), None)
    if blocks is None or not 0 <= layer < len(blocks):
        raise IndexError(f"The encoder has no block {layer}.")
    return blocks[layer]


def pooled_features(model, tokenizer, layout, layer: int, texts: list[str]) -> torch.Tensor:
    """`(len(texts), hidden)` fp32 features: the unit-normalised hidden states after block `layer`, mean-pooled.

    The forward pass stops after that block; encoder-decoders run their encoder (the prompt's side). Each text
    is tokenised without special tokens and padded on the right, so a text's features do not depend on the batch it
    is in. An empty text gets zero features (cosine 0 with every entry).
    """
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(1, max((len(r) for r in rows), default=1))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = input_device(model)
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    run = model.get_encoder() if encoder_decoder else model
    block = feature_block(model, layout, layer)

    def stop(module, args, output):
        raise _FeaturesReady(output[0] if isinstance(output, (tuple, list)) else output)

    handle = block.register_forward_hook(stop)
    try:
        with torch.no_grad():
            run(input_ids=input_ids, attention_mask=mask, **({} if encoder_decoder else {"use_cache": False}))
        raise RuntimeError(f"The feature block {layer} did not run in the forward pass.")
    except _FeaturesReady as ready:
        hidden = ready.hidden
    finally:
        handle.remove()
    hidden = nn.functional.normalize(hidden.float(), dim=-1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ScopeClassifier(nn.Module):
    """The trainable part of SERAC's scope classifier: the projection, the feature mean, the scale and the threshold.

    Args:
        hidden (`int`): the feature size (the base model's hidden size).
        threshold (`float`): the initial in-scope cosine threshold.
        scale (`float`): the initial scale of the pair logits.

    >>> classifier = ScopeClassifier(4, threshold=0.75, scale=10.0).eval()
    >>> x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    >>> keys = classifier.embed(x[:1])
    >>> (classifier.embed(x) @ keys.T).squeeze(-1) > classifier.threshold
    tensor([ True,  True, False])
    """

    def __init__(self, hidden: int, threshold: float = 0.75, scale: float = 10.0):
        super().__init__()
        self.projection = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(hidden))
            self.projection.bias.zero_()
        self.register_buffer("feature_mean", torch.zeros(hidden))
        self.register_buffer("num_features_seen", torch.zeros((), dtype=torch.float64))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    @property
    def hidden_size(self) -> int:
        return self.projection.in_features

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings `(n, hidden)` of pooled features; in training mode the feature mean is updated."""
        features = features.float()
        if self.training and len(features):
            with torch.no_grad():
                total = self.num_features_seen + len(features)
                self.feature_mean += (features.mean(0) - self.feature_mean) * (len(features) / total).float()
                self.num_features_seen.copy_(total)
        return nn.functional.normalize(self.projection(features - self.feature_mean), dim=-1)

    def pair_logits(self, similarities: torch.Tensor) -> torch.Tensor:
        """`scale · (cos - threshold)`: positive exactly when a pair is in scope."""
        return self.log_scale.exp() * (similarities - self.threshold)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random in-scope pair scores above a random out-of-scope one (ties count one half)."""
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return float("nan")
    difference = positive[:, None] - negative[None, :]
    return float((difference > 0).float().mean() + 0.5 * (difference == 0).float().mean())
