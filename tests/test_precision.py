"""fp16 and bf16 models: edits solved in fp32 raise the target's probability, deltas stay in fp32, and an edit whose
effect is lost to rounding (when applied, or when merged into half-precision weights) is reported with a warning."""

import warnings

import pytest
import torch

from hf_knowedit import EditedModel
from hf_knowedit.methods.ft import FTConfig
from hf_knowedit.methods.kn import KNConfig
from hf_knowedit.precision import PrecisionWarning, check_merge_effect, target_log_probs

from .test_locate_then_edit import REQUESTS, fast_config, sharpened_model, target_probs
from .tiny_models import tiny_tokenizer


HALF = [torch.bfloat16, torch.float16]
TOKENIZER = tiny_tokenizer()
pytestmark = pytest.mark.usefixtures("isolated_statistics_cache")




def edit_without_warnings(model, config, requests) -> EditedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        return EditedModel(model, TOKENIZER).add_edits(config, requests)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_half_precision_edit_raises_the_target_probability(method, dtype, tmp_path):
    model = sharpened_model("llama").to(dtype)
    before = target_probs(model, REQUESTS[:2])
    edited = edit_without_warnings(model, fast_config(method), REQUESTS[:2])
    after = target_probs(edited, REQUESTS[:2])
    assert (after > 0.5).all() and (before < 1e-10).all(), (before, after)
    check = edited.get_edit().stats["precision_check"]
    assert check["dtype"] == str(dtype).removeprefix("torch.") and check["lost"] == []
    assert all(effect > 10 for effect in check["effects"])
    # Deltas are kept in fp32 and survive a save and reload onto the half-precision model.
    assert {c.compute_dtype for comps in edited.get_edit().components.values() for c in comps} == {torch.float32}
    edited.save_pretrained(tmp_path / "edit")
    reloaded = EditedModel.from_pretrained(sharpened_model("llama").to(dtype), tmp_path / "edit", tokenizer=TOKENIZER)
    torch.testing.assert_close(target_probs(reloaded, REQUESTS[:2]), after, rtol=0, atol=0)
    # Merging into half-precision weights keeps the edit.
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        edited.merge_edits()
    assert (target_probs(edited, REQUESTS[:2]) > 0.5).all()


def test_an_edit_lost_to_rounding_warns():
    config = FTConfig(num_steps=20, lr=1e-2, norm_constraint=3e-5)  # changes far below bfloat16's resolution
    full = EditedModel(sharpened_model("llama"), TOKENIZER)
    base = target_log_probs(full, TOKENIZER, REQUESTS[:2])
    full = edit_without_warnings(full.base_model, config, REQUESTS[:2])  # float32: no check, no warning
    assert "precision_check" not in full.get_edit().stats
    assert all(a - b > 0.01 for a, b in zip(target_log_probs(full, TOKENIZER, REQUESTS[:2]), base))

    half = EditedModel(sharpened_model("llama").to(torch.bfloat16), TOKENIZER)
    with pytest.warns(PrecisionWarning, match="In bfloat16, the edit 'default' raised the target's mean"):
        half.add_edits(config, REQUESTS[:2])
    assert half.get_edit().stats["precision_check"]["lost"] == [0, 1]

    quiet = EditedModel(sharpened_model("llama").to(torch.bfloat16), TOKENIZER)
    quiet.check_precision = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        quiet.add_edits(config, REQUESTS[:2])
    assert "precision_check" not in quiet.get_edit().stats


def test_merging_that_rounds_the_edit_away_warns_and_unmerges_exactly():
    config = FTConfig(num_steps=20, lr=1e-2, norm_constraint=7e-5, layers=[1, 2, 3])
    edited = EditedModel(sharpened_model("llama").to(torch.bfloat16), TOKENIZER).add_edits(config, REQUESTS[:2])
    unmerged = target_log_probs(edited, TOKENIZER, REQUESTS[:2])
    with pytest.warns(PrecisionWarning, match="Merging into bfloat16 weights rounded away"):
        edited.merge_edits()
    assert edited.get_edit().stats["merge_precision_check"]["lost"]
    edited.unmerge_edits()
    assert target_log_probs(edited, TOKENIZER, REQUESTS[:2]) == unmerged


def test_merge_check_arithmetic():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        kept = check_merge_effect(torch.float16, REQUESTS[:2], [-5.0, -5.0], [-1.0, -5.001], [-2.0, -5.0])
    assert kept["kept_fraction"] == [0.75, 1.0] and kept["lost"] == []  # the second edit had no effect to lose
    with pytest.warns(PrecisionWarning, match="float16"):
        lost = check_merge_effect(torch.float16, REQUESTS[:1], [-5.0], [-1.0], [-4.5])
    assert lost["lost"] == [0] and lost["kept_fraction"] == [0.125]


def test_an_erasing_edit_is_not_checked_for_raising_the_target():
    """KN's erase mode zeroes knowledge neurons; it does not aim at `target_new`, so no warning says it missed it."""
    model = sharpened_model("llama").to(torch.bfloat16)
    edited = edit_without_warnings(model, KNConfig(mode="erase", steps=4, layers=[2]), REQUESTS[:1])
    assert "precision_check" not in edited.get_edit().stats
    assert KNConfig(mode="erase").raises_target_new is False and KNConfig().raises_target_new is True
