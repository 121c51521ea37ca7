"""Batched scoring of prompts: teacher-forced target predictions and log-probabilities, and greedy generations.

The metrics of :mod:`hf_knowedit.metrics` are pure functions of what this module computes. Scoring many prompts at once
in padded batches (sorted by length, identical requests computed once; under an edit whose prompts share long
contexts, IKE's, the prompts of one context batched together so that the model runs it once) is what makes evaluating
thousands of probes affordable; `benchmarks/bench_scoring.py` compares it with scoring one prompt at a time.
"""

import contextlib
from dataclasses import dataclass

import torch

from .devices import input_device
from .tokenization import encode_prompt_target


@dataclass(frozen=True)
class TargetScore:
    """What the model predicts for a target that follows a prompt (teacher forcing).

    Args:
        predicted_ids (`tuple[int, ...]`):
            The model's argmax token at each target position, given the prompt and the previous target tokens.
        target_ids (`tuple[int, ...]`):
            The target's tokens, as :func:`~hf_knowedit.tokenization.encode_prompt_target` splits them.
        mean_log_prob (`float`):
            The mean over target tokens of their log-probability (ROME compares this quantity, as an NLL).
    """

    predicted_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    mean_log_prob: float


@contextlib.contextmanager
def padding_side(tokenizer, side: str):
    """Temporarily set `tokenizer.padding_side` (left padding for generation), restoring it afterwards."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = previous


class BatchScorer:
    """Scores many prompts at once with a model (an `EditedModel` or any causal or seq2seq LM) and its tokenizer.

    Args:
        model:
            The model; its current state (active edits included) is what gets scored.
        tokenizer:
            Its tokenizer; needs a pad token (or an eos token, used for padding).
        batch_size (`int`, *optional*, defaults to `32`):
            Prompts per forward pass (or per `generate` call). `1` scores one prompt at a time.

    Example:

    ```python
    >>> from hf_knowedit.scoring import BatchScorer
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> scorer = BatchScorer(tiny_model("gpt2"), tiny_tokenizer())
    >>> [len(s.target_ids) for s in scorer.score_targets(["The capital of France is"], ["Paris"])]
    [1]
    >>> len(scorer.generate(["The capital of France is"], max_new_tokens=3))
    1

    ```
    """

    def __init__(self, model, tokenizer, batch_size: int = 32):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def _batches(self, items: list, key) -> list[list[int]]:
        """Indices of `items` grouped into batches of similar length (less padding), deterministic."""
        order = sorted(range(len(items)), key=lambda i: (key(items[i]), i))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def score_targets(self, prompts: list[str], targets: list[str]) -> list[TargetScore]:
        """Teacher-forced argmax predictions and mean log-probability of each `target` after its `prompt`."""
        if len(prompts) != len(targets):
            raise ValueError(f"Got {len(prompts)} prompts but {len(targets)} targets.")
        unique = list(dict.fromkeys(zip(prompts, targets)))
        results: dict[tuple[str, str], TargetScore] = {}
        device = input_device(self.model)
        context_groups = getattr(self.model, "context_groups", None)
        groups = context_groups([p for p, _ in unique]) if context_groups is not None else None
        if groups is not None:  # the prompts of one context together, then by length
            keyed = [(group, len(p) + len(t)) for group, (p, t) in zip(groups, unique, strict=True)]
            batches = self._batches(list(range(len(unique))), key=keyed.__getitem__)
        else:
            batches = self._batches(unique, key=lambda pair: len(pair[0]) + len(pair[1]))
        for indices in batches:
            pairs = [unique[i] for i in indices]
            batch = encode_prompt_target(self.tokenizer, [p for p, _ in pairs], [t for _, t in pairs],
                                         model=self.model).to(device)
            logits = self.model(**batch.model_inputs()).logits
            aligned = batch.target_logits(logits).float()
            mean_log_probs = batch.target_log_probs(logits).tolist()
            argmax = aligned.argmax(-1)
            mask = batch.labels != -100
            for row, pair in enumerate(pairs):
                positions = mask[row]
                results[pair] = TargetScore(
                    predicted_ids=tuple(argmax[row][positions].tolist()),
                    target_ids=tuple(batch.labels[row][positions].tolist()),
                    mean_log_prob=float(mean_log_probs[row]),
                )
        return [results[pair] for pair in zip(prompts, targets)]

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int | list[int]) -> list[str]:
        """Greedy continuations of `prompts` (decoded, special tokens dropped), `max_new_tokens` each at most.

        Decoder-only models are fed left-padded batches; the tokenizer's padding side is restored afterwards.
        """
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(limits)} max_new_tokens.")
        unique = list(dict.fromkeys(zip(prompts, limits)))
        results: dict[tuple[str, int], str] = {}
        device = input_device(self.model)
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        side = "right" if self.is_encoder_decoder else "left"
        with padding_side(tokenizer, side):
            for indices in self._batches(unique, key=lambda item: (len(item[0]), item[1])):
                items = [unique[i] for i in indices]
                limit = max(n for _, n in items)
                inputs = tokenizer([p for p, _ in items], return_tensors="pt", padding=True).to(device)
                if "token_type_ids" in inputs:
                    del inputs["token_type_ids"]
                output = self.model.generate(
                    **inputs, max_new_tokens=limit, do_sample=False, pad_token_id=pad_id, num_beams=1
                )
                new_tokens = output if self.is_encoder_decoder else output[:, inputs["input_ids"].shape[1] :]
                if self.is_encoder_decoder:
                    new_tokens = new_tokens[:, 1:]  # drop the decoder start token
                for row, (prompt, n) in enumerate(items):
                    results[(prompt, n)] = tokenizer.decode(new_tokens[row][:n], skip_special_tokens=True)
        return [results[item] for item in zip(prompts, limits)]


__all__ = ["BatchScorer", "TargetScore", "padding_side"]
