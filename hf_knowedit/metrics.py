"""Knowledge-editing metrics as pure functions over precomputed model outputs.

Every function takes what a model produced (teacher-forced argmax tokens, log-probabilities or greedy generations,
computed by :mod:`hf_knowedit.scoring`) and what it should have produced, and returns a dict that always names its
protocol, so that a number never travels without its definition:

```python
{"score": 0.75, "protocol": "token_accuracy", "num_examples": 2, "scores": [1.0, 0.5]}
```

Protocols (`PROTOCOLS`):

- `"token_accuracy"` (EasyEdit; Yao et al. 2023, Zhang et al. 2024): the prompt is followed by the answer (teacher
  forcing) and an example scores the fraction of answer tokens that are the model's argmax prediction at their
  position. `predictions` and `references` are lists of token-id lists.
- `"prob_comparison"` (ROME's efficacy and paraphrase scores; Meng et al. 2022): an example scores 1 when the mean
  per-token log-probability of the answer that should win is strictly larger than that of the answer that should lose
  (ROME compares mean negative log-likelihoods over the answer's tokens), else 0. `predictions` and `references` are
  lists of floats.
- `"exact_match"`: an example scores 1 when the model's greedy continuation, whitespace-normalised, starts with one of
  the accepted answers, whitespace-normalised, followed by a word boundary (the end of the text or a character that is
  not a letter or digit), else 0. `predictions` are strings, `references` a string or a list of aliases per example.

Each metric's score is the arithmetic mean of the example scores. Empty inputs raise `ValueError`: a metric that cannot
be computed is skipped by its caller and counted, never reported as zero.

Example:

```python
>>> from hf_knowedit.metrics import edit_reliability
>>> edit_reliability([[5, 7]], [[5, 8]], protocol="token_accuracy")["score"]
0.5

```
"""

import math
import re
from collections import Counter
from collections.abc import Sequence


PROTOCOLS: tuple[str, ...] = ("token_accuracy", "prob_comparison", "exact_match")
LOCALITY_VARIANTS: tuple[str, ...] = ("unchanged", "ground_truth")
FLUENCY_PROTOCOL = "ngram_entropy"
ROME_NGRAM_ORDERS: tuple[int, ...] = (2, 3)
ROME_NGRAM_WEIGHTS: tuple[float, ...] = (2 / 3, 4 / 3)

_WHITESPACE = re.compile(r"\s+")
# Words (letters, digits, underscores, inner apostrophes and hyphens) and single punctuation marks: a dependency-free
# stand-in for nltk.word_tokenize, which ROME uses. It agrees with it on plain prose; it differs on contractions
# ("don't" is one token here, two there) and on quotes.
_WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


# -- per-example scores --------------------------------------------------------------------------------------------
def token_accuracy(predicted_ids: Sequence[int], target_ids: Sequence[int]) -> float:
    """Fraction of target tokens equal to the teacher-forced argmax prediction at their position (EasyEdit)."""
    predicted_ids, target_ids = list(predicted_ids), list(target_ids)
    if not target_ids:
        raise ValueError("token_accuracy needs at least one target token, got an empty target.")
    if len(predicted_ids) != len(target_ids):
        raise ValueError(
            f"token_accuracy compares position by position; got {len(predicted_ids)} predicted and "
            f"{len(target_ids)} target tokens."
        )
    return sum(int(p) == int(t) for p, t in zip(predicted_ids, target_ids)) / len(target_ids)


def prob_comparison(winner_log_prob: float, loser_log_prob: float) -> float:
    """1.0 when the answer that should win has a strictly higher mean token log-probability, else 0.0 (ROME)."""
    winner_log_prob, loser_log_prob = float(winner_log_prob), float(loser_log_prob)
    if math.isnan(winner_log_prob) or math.isnan(loser_log_prob):
        raise ValueError("prob_comparison got a NaN log-probability.")
    return float(winner_log_prob > loser_log_prob)


def normalize_text(text: str, ignore_case: bool = False) -> str:
    """Strip the text and collapse every run of whitespace to one space (and casefold with `ignore_case`)."""
    text = _WHITESPACE.sub(" ", str(text)).strip()
    return text.casefold() if ignore_case else text


def exact_match(generation: str, answers: str | Sequence[str], ignore_case: bool = False) -> float:
    """1.0 when the normalised generation starts with a normalised answer followed by a word boundary, else 0.0.

    `answers` is one answer or a list of aliases; any alias counts. `"Paris is"` matches `"Paris"`, `"Parisian"` does
    not.
    """
    aliases = [answers] if isinstance(answers, str) else list(answers)
    aliases = [normalize_text(a, ignore_case) for a in aliases if str(a).strip()]
    if not aliases:
        raise ValueError("exact_match needs at least one non-empty answer.")
    text = normalize_text(generation, ignore_case)
    for alias in aliases:
        if text.startswith(alias) and (len(text) == len(alias) or not text[len(alias)].isalnum()):
            return 1.0
    return 0.0


def word_tokenize(text: str) -> list[str]:
    """Split text into words and punctuation marks (a stand-in for `nltk.word_tokenize`, see the module notes)."""
    return _WORD.findall(str(text))


def ngram_entropy(
    text: str, orders: Sequence[int] = ROME_NGRAM_ORDERS, weights: Sequence[float] = ROME_NGRAM_WEIGHTS
) -> float:
    """ROME's fluency of one text: the mean over n of `weight_n * H_n`, `H_n` the entropy in bits of its n-grams.

    As `compute_n_gram_entropy` in kmeng01/rome `experiments/py/eval_utils_counterfact.py`: n = 2 and 3 with weights
    2/3 and 4/3, frequencies of the word n-grams of the text, `H_n = -sum(f log2 f)`, and the arithmetic mean of the
    two weighted entropies. A text with fewer than n words has `H_n = 0`.
    """
    if len(orders) != len(weights):
        raise ValueError(f"orders and weights must have the same length, got {list(orders)} and {list(weights)}.")
    tokens = word_tokenize(text)
    weighted = []
    for n, weight in zip(orders, weights):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


# -- metrics -------------------------------------------------------------------------------------------------------
def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")


def _example_scores(predictions, references, protocol: str, ignore_case: bool = False) -> list[float]:
    _check_protocol(protocol)
    predictions, references = list(predictions), list(references)
    if not predictions:
        raise ValueError("The metric needs at least one example; got empty predictions.")
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    if protocol == "token_accuracy":
        return [token_accuracy(p, r) for p, r in zip(predictions, references)]
    if protocol == "prob_comparison":
        return [prob_comparison(p, r) for p, r in zip(predictions, references)]
    return [exact_match(p, r, ignore_case=ignore_case) for p, r in zip(predictions, references)]


def _result(scores: list[float], protocol: str, **extra) -> dict:
    return {"score": sum(scores) / len(scores), "protocol": protocol, "num_examples": len(scores), "scores": scores,
            **extra}


def edit_reliability(predictions, references, protocol: str = "token_accuracy", ignore_case: bool = False) -> dict:
    """Edit success on the edit prompt itself, against `target_new`.

    Args:
        predictions:
            Per example: the teacher-forced argmax token ids at the target's positions (`token_accuracy`), the mean
            token log-probability of `target_new` (`prob_comparison`), or the greedy continuation (`exact_match`).
        references:
            Per example: the token ids of `target_new` (`token_accuracy`), the mean token log-probability of
            `target_true` (`prob_comparison`), or `target_new` (a string or a list of aliases, `exact_match`).
        protocol (`str`, *optional*, defaults to `"token_accuracy"`):
            One of `PROTOCOLS`.
        ignore_case (`bool`, *optional*, defaults to `False`):
            `exact_match` only: casefold both sides.

    Returns:
        `dict`: `score` (mean over examples), `protocol`, `num_examples` and the per-example `scores`.

    Example:

    ```python
    >>> edit_reliability([-0.5, -2.0], [-1.0, -1.0], protocol="prob_comparison")["score"]
    0.5

    ```
    """
    return _result(_example_scores(predictions, references, protocol, ignore_case), protocol)


def edit_generalization(predictions, references, protocol: str = "token_accuracy", ignore_case: bool = False) -> dict:
    """Edit success on paraphrases of the edit prompt, against `target_new`; inputs as :func:`edit_reliability`.

    Example:

    ```python
    >>> edit_generalization(["English is spoken"], [["English", "the English language"]], protocol="exact_match")
    {'score': 1.0, 'protocol': 'exact_match', 'num_examples': 1, 'scores': [1.0]}

    ```
    """
    return _result(_example_scores(predictions, references, protocol, ignore_case), protocol)


def edit_portability(predictions, references, protocol: str = "token_accuracy", ignore_case: bool = False) -> dict:
    """Success on questions whose answers follow from the edit (reasoning, aliases), against their answers.

    Inputs as :func:`edit_reliability`, with the portability answer in place of `target_new`; for `prob_comparison`,
    `references` are the log-probabilities of a contrasting answer the caller chooses.

    Example:

    ```python
    >>> edit_portability([[3, 4, 5]], [[3, 4, 6]])["score"]
    0.6666666666666666

    ```
    """
    return _result(_example_scores(predictions, references, protocol, ignore_case), protocol)


def edit_locality(
    predictions, references, protocol: str = "token_accuracy", variant: str = "unchanged", ignore_case: bool = False
) -> dict:
    """Whether unrelated prompts are left alone by the edit, in one of two variants.

    `variant="unchanged"` scores agreement of the post-edit output with the pre-edit output on the locality prompt:

    - `token_accuracy`: `predictions` and `references` are the post- and pre-edit teacher-forced argmax token ids
      (teacher-forced on the locality answer); the fraction of positions where they agree (EasyEdit's locality).
    - `prob_comparison`: `predictions` and `references` are the post- and pre-edit margins
      `log P(locality answer) - log P(target_new)` (mean token log-probabilities); 1 when the sign of the margin (which
      answer the model prefers) is the same before and after the edit.
    - `exact_match`: `predictions` and `references` are the post- and pre-edit greedy continuations; 1 when they are
      equal after whitespace normalisation.

    `variant="ground_truth"` scores accuracy against the locality answer, inputs as :func:`edit_reliability` with the
    locality answer in place of `target_new`; for `prob_comparison`, `predictions` are log P(locality answer) and
    `references` log P(target_new) on the locality prompt: ROME's neighborhood score.

    Example:

    ```python
    >>> edit_locality([[1, 2]], [[1, 9]], variant="unchanged")["score"]
    0.5
    >>> edit_locality(["Paris."], ["Paris, France"], protocol="exact_match", variant="unchanged")["score"]
    0.0

    ```
    """
    if variant not in LOCALITY_VARIANTS:
        raise ValueError(f"variant must be one of {LOCALITY_VARIANTS}, got {variant!r}.")
    _check_protocol(protocol)
    if variant == "ground_truth" or protocol == "token_accuracy":
        return _result(_example_scores(predictions, references, protocol, ignore_case), protocol, variant=variant)
    predictions, references = list(predictions), list(references)
    if not predictions:
        raise ValueError("The metric needs at least one example; got empty predictions.")
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    if protocol == "prob_comparison":
        scores = [float((float(post) > 0) == (float(pre) > 0)) for post, pre in zip(predictions, references)]
    else:
        scores = [float(normalize_text(post, ignore_case) == normalize_text(pre, ignore_case))
                  for post, pre in zip(predictions, references)]
    return _result(scores, protocol, variant=variant)


def edit_fluency(
    predictions,
    protocol: str = FLUENCY_PROTOCOL,
    orders: Sequence[int] = ROME_NGRAM_ORDERS,
    weights: Sequence[float] = ROME_NGRAM_WEIGHTS,
) -> dict:
    """ROME's generation fluency: the mean over generated texts of their weighted 2- and 3-gram entropy.

    Fluency has one protocol, `"ngram_entropy"`, on free greedy generations (see :func:`ngram_entropy`); higher is
    more varied text, and repetitive degenerate text scores low.

    Example:

    ```python
    >>> round(edit_fluency(["a b a b"])["score"], 4)  # bigrams ab, ba, ab; trigrams aba, bab
    0.9728

    ```
    """
    if protocol != FLUENCY_PROTOCOL:
        raise ValueError(f"edit_fluency has the single protocol {FLUENCY_PROTOCOL!r}, got {protocol!r}.")
    predictions = [str(p) for p in predictions]
    if not predictions:
        raise ValueError("edit_fluency needs at least one generated text.")
    return _result([ngram_entropy(p, orders, weights) for p in predictions], protocol)


__all__ = [
    "LOCALITY_VARIANTS",
    "PROTOCOLS",
    "edit_fluency",
    "evaluate_features",
    "edit_generalization",
    "edit_locality",
    "edit_portability",
    "edit_reliability",
    "exact_match",
    "ngram_entropy",
    "normalize_text",
    "prob_comparison",
    "token_accuracy",
    "word_tokenize",
]


def evaluate_features():
    """The input types the `evaluate` modules of the probe metrics accept, one `datasets.Features` per protocol:
    token ids (`token_accuracy`), log-probabilities (`prob_comparison`), and texts with one or several accepted
    answers (`exact_match`)."""
    import datasets

    return [
        datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                           "references": datasets.Sequence(datasets.Value("int64"))}),
        datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
        datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        datasets.Features({"predictions": datasets.Value("string"),
                           "references": datasets.Sequence(datasets.Value("string"))}),
    ]
