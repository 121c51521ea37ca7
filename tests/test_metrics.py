"""Tests of `hf_knowedit.metrics` against values computed by hand, and of the `evaluate` modules that wrap them."""

import math
import os
from pathlib import Path

import pytest

from hf_knowedit.metrics import (
    LOCALITY_VARIANTS,
    PROTOCOLS,
    edit_fluency,
    edit_generalization,
    edit_locality,
    edit_portability,
    edit_reliability,
    exact_match,
    ngram_entropy,
    normalize_text,
    token_accuracy,
    word_tokenize,
)


METRICS_DIR = Path(__file__).resolve().parents[1] / "evaluate_metrics"
SUCCESS_METRICS = {"edit_reliability": edit_reliability, "edit_generalization": edit_generalization,
                   "edit_portability": edit_portability}

# Small fixed inputs and their scores, computed by hand.
# token_accuracy: [5, 7] vs [5, 8] -> 1/2; [2] vs [2] -> 1; [1, 2, 3] vs [1, 0, 0] -> 1/3; mean = (1/2 + 1 + 1/3) / 3
TA_PREDICTIONS = [[5, 7], [2], [1, 2, 3]]
TA_REFERENCES = [[5, 8], [2], [1, 0, 0]]
TA_SCORES = [0.5, 1.0, 1 / 3]
# prob_comparison: -0.5 > -1.0 yes; -2.0 > -1.0 no; -1.0 > -1.0 no (strict)
PC_PREDICTIONS = [-0.5, -2.0, -1.0]
PC_REFERENCES = [-1.0, -1.0, -1.0]
PC_SCORES = [1.0, 0.0, 0.0]
# exact_match: prefix at a word boundary, whitespace normalised, any alias
EM_PREDICTIONS = ["  English  is   spoken", "Parisian food", "the  United   States.", "Rome"]
EM_REFERENCES = ["English", ["Paris"], ["USA", "the United States"], ["rome"]]
EM_SCORES = [1.0, 0.0, 1.0, 0.0]
HAND = {
    "token_accuracy": (TA_PREDICTIONS, TA_REFERENCES, TA_SCORES),
    "prob_comparison": (PC_PREDICTIONS, PC_REFERENCES, PC_SCORES),
    "exact_match": (EM_PREDICTIONS, EM_REFERENCES, EM_SCORES),
}


@pytest.mark.parametrize("name", sorted(SUCCESS_METRICS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_success_metrics_match_hand_computed_values(name, protocol):
    predictions, references, scores = HAND[protocol]
    result = SUCCESS_METRICS[name](predictions, references, protocol=protocol)
    assert result["protocol"] == protocol
    assert result["num_examples"] == len(scores)
    assert result["scores"] == pytest.approx(scores)
    assert result["score"] == pytest.approx(sum(scores) / len(scores))


def test_per_example_functions():
    assert token_accuracy([3, 4, 5, 6], [3, 4, 0, 6]) == 0.75
    assert exact_match("Paris, France", "Paris") == 1.0
    assert exact_match("Paris", "Paris") == 1.0
    assert exact_match("Par", "Paris") == 0.0
    assert exact_match("ROME is", "rome", ignore_case=True) == 1.0
    assert normalize_text(" a \n\t b ") == "a b"
    with pytest.raises(ValueError, match="position by position"):
        token_accuracy([1], [1, 2])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_locality_ground_truth_is_accuracy_against_the_answer(protocol):
    predictions, references, scores = HAND[protocol]
    result = edit_locality(predictions, references, protocol=protocol, variant="ground_truth")
    assert result["variant"] == "ground_truth" and result["protocol"] == protocol
    assert result["score"] == pytest.approx(sum(scores) / len(scores))


@pytest.mark.parametrize(
    "protocol, post, pre, expected",
    [
        # positions agreeing with the pre-edit argmax: 2/3 and 0/1 -> mean 1/3
        ("token_accuracy", [[10, 11, 12], [4]], [[10, 11, 99], [5]], [2 / 3, 0.0]),
        # margin log P(answer) - log P(target_new) keeps its sign: + -> + yes, + -> - no, - -> - yes
        ("prob_comparison", [0.3, -0.1, -2.0], [1.2, 0.4, -0.5], [1.0, 0.0, 1.0]),
        # greedy continuations equal after whitespace normalisation
        ("exact_match", ["French  and", "Paris"], [" French and ", "Paris, France"], [1.0, 0.0]),
    ],
)
def test_locality_unchanged(protocol, post, pre, expected):
    result = edit_locality(post, pre, protocol=protocol, variant="unchanged")
    assert result["variant"] == "unchanged" and result["protocol"] == protocol
    assert result["scores"] == pytest.approx(expected)
    assert result["score"] == pytest.approx(sum(expected) / len(expected))


def test_fluency_is_rome_weighted_ngram_entropy():
    # "a b a b": bigrams ab, ba, ab -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    # All distinct: "x y z w" -> 3 bigrams (log2 3 bits), 2 trigrams (1 bit).
    distinct = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert ngram_entropy("x y z w") == pytest.approx(distinct)
    assert ngram_entropy("one") == 0.0  # fewer words than n: zero entropy, as in ROME
    result = edit_fluency(["a b a b", "x y z w"])
    assert result["protocol"] == "ngram_entropy"
    assert result["score"] == pytest.approx((expected + distinct) / 2)
    assert word_tokenize("Hello, world!") == ["Hello", ",", "world", "!"]
    with pytest.raises(ValueError, match="single protocol"):
        edit_fluency(["a b"], protocol="token_accuracy")


def test_bad_inputs_raise_instead_of_scoring_zero():
    with pytest.raises(ValueError, match="protocol must be one of"):
        edit_reliability([[1]], [[1]], protocol="accuracy")
    with pytest.raises(ValueError, match="at least one example"):
        edit_portability([], [], protocol="token_accuracy")
    with pytest.raises(ValueError, match="predictions but"):
        edit_generalization([[1]], [[1], [2]])
    with pytest.raises(ValueError, match="variant must be one of"):
        edit_locality([[1]], [[1]], variant="both")
    with pytest.raises(ValueError, match="non-empty answer"):
        exact_match("x", [])


# -- the evaluate modules ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluate_offline():
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import evaluate

    yield evaluate
    if previous is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = previous


def _load(evaluate, name):
    return evaluate.load(str(METRICS_DIR / name))


@pytest.mark.parametrize("name", sorted(SUCCESS_METRICS))
def test_evaluate_modules_load_offline_and_agree_with_the_functions(evaluate_offline, name):
    module = _load(evaluate_offline, name)
    for protocol, (predictions, references, _) in HAND.items():
        if protocol == "exact_match":  # the module's string features: one alias list per example
            references = [[r] if isinstance(r, str) else r for r in references]
        got = module.compute(predictions=predictions, references=references, protocol=protocol)
        assert got == SUCCESS_METRICS[name](predictions, references, protocol=protocol)
    for attribute in ("_DESCRIPTION", "_KWARGS_DESCRIPTION", "_CITATION"):
        assert (METRICS_DIR / name / f"{name}.py").read_text().count(attribute) >= 2


def test_evaluate_locality_module(evaluate_offline):
    module = _load(evaluate_offline, "edit_locality")
    cases = [("token_accuracy", [[10, 11, 12]], [[10, 11, 99]]), ("prob_comparison", [0.3, -0.1], [1.2, 0.4]),
             ("exact_match", ["French and"], ["French and"])]
    for protocol, post, pre in cases:
        for variant in LOCALITY_VARIANTS:
            if variant == "ground_truth" and protocol == "exact_match":
                pre = [["French"]]
            got = module.compute(predictions=post, references=pre, protocol=protocol, variant=variant)
            assert got == edit_locality(post, pre, protocol=protocol, variant=variant)


def test_evaluate_fluency_module(evaluate_offline):
    module = _load(evaluate_offline, "edit_fluency")
    texts = ["a b a b", "the cat sat on the mat and the cat sat"]
    assert module.compute(predictions=texts) == edit_fluency(texts)


def test_every_module_has_a_readme_with_definition_and_citation():
    for folder in sorted(p for p in METRICS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        readme = (folder / "README.md").read_text()
        assert "## Metric description" in readme and "## Citation" in readme, folder.name
