"""The edit API on tiny models of every architecture: FT edits, switching, merging, stacking, saving, bad input."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from hf_knowedit import (
    BaseEditor,
    BaseModelMismatchError,
    DenseDelta,
    EditConfig,
    EditConfigError,
    EditedModel,
    EditFailedError,
    EditNotFoundError,
    EditRequestError,
    FTConfig,
    get_edited_model,
)
from hf_knowedit.architectures import linear_shape
from hf_knowedit.config import EDIT_METHODS
from hf_knowedit.methods.ft import FTEditor

from .helpers import (
    BATCH,
    REQUEST,
    TOKENIZER,
    Snapshot,
    assert_same_state,
    fast_ft,
    forward_hooks,
    logits,
    model_inputs,
    state_copy,
    target_log_prob,
)
from .tiny_models import ARCHITECTURES, MAX_POSITIONS, NUM_LAYERS, tiny_model


@dataclass
class DummyConfig(EditConfig):
    """A method registered by the tests only."""

    edit_type: ClassVar[str] = "dummy"


class FailingEditor(BaseEditor):
    """Trains a temporary delta, flips the model's flags, then fails, as a buggy method would."""

    config_class = DummyConfig

    def compute_components(self, edited_model, requests):
        path = edited_model.layout.mlp_out_path(0)
        module = edited_model.base_model.get_submodule(path)
        delta = DenseDelta(torch.ones(linear_shape(module)), trainable=True)
        with edited_model.temporary_components({path: delta}):
            edited_model(**model_inputs(edited_model.base_model, ["Hello world"]))
            edited_model.base_model.train()
            next(edited_model.base_model.parameters()).requires_grad_(True)
            raise RuntimeError("boom in the middle of the edit")


@pytest.fixture
def dummy_method(monkeypatch):
    """Register `dummy` with the failing editor for the test's duration."""
    monkeypatch.setitem(EDIT_METHODS, "dummy", (DummyConfig, FailingEditor))


def ft_paths(edited, target_module: str) -> list[str]:
    layout = edited.layout
    layer = layout.default_layers(fraction=2 / 3)[0]
    return {
        "mlp_out": [layout.mlp_out_path(layer)],
        "mlp_in": list(layout.mlp_in_paths(layer)),
        "attn_out": [layout.attn_out_path(layer)],
    }[target_module]


def edited_tiny(arch: str, config: FTConfig | None = None, requests=(REQUEST,), **kwargs) -> EditedModel:
    """A tiny model of `arch` holding one FT edit named `default`."""
    return EditedModel(tiny_model(arch, **kwargs), TOKENIZER).add_edits(config or fast_ft(), list(requests))


def long_prompt_request():
    return {"prompt": "Once upon a time " * (MAX_POSITIONS // 3) + "{} lived in", "subject": "Atlantis",
            "target_new": "Paris"}


# Each bad call: (expected error, call on an EditedModel that holds one edit already).
BAD_EDITS = {
    "subject_not_in_prompt": (EditRequestError, lambda e: e.add_edits(
        fast_ft(), [{"prompt": "The capital of France is", "subject": "Atlantis", "target_new": "Paris"}])),
    "empty_target": (EditRequestError, lambda e: e.add_edits(
        fast_ft(), [{"prompt": "The capital of {} is", "subject": "Atlantis", "target_new": ""}])),
    "blank_target": (EditRequestError, lambda e: e.add_edits(
        fast_ft(), [{"prompt": "The capital of {} is", "subject": "Atlantis", "target_new": "  "}], edit_name="x")),
    "missing_target_key": (EditRequestError, lambda e: e.add_edits(
        fast_ft(), [{"prompt": "The capital of {} is", "subject": "Atlantis"}], edit_name="x")),
    "empty_request_list": (EditRequestError, lambda e: e.add_edits(fast_ft(), [], edit_name="x")),
    "prompt_too_long": (EditRequestError, lambda e: e.add_edits(
        fast_ft(), [REQUEST, long_prompt_request()], edit_name="x")),
    "layer_too_large": (EditConfigError, lambda e: e.add_edits(fast_ft(layers=[99]), [REQUEST], edit_name="x")),
    "layer_at_depth": (EditConfigError, lambda e: e.add_edits(
        fast_ft(layers=[1, NUM_LAYERS]), [REQUEST], edit_name="x")),
    "negative_layer": (EditConfigError, lambda e: e.add_edits(fast_ft(layers=[-1]), [REQUEST], edit_name="x")),
    "not_a_config": (EditConfigError, lambda e: e.add_edits({"num_steps": 2}, [REQUEST], edit_name="x")),
    "bad_edit_name": (EditConfigError, lambda e: e.add_edits(fast_ft(), [REQUEST], edit_name="a/b")),
    "other_config_for_same_name": (EditConfigError, lambda e: e.add_edits(fast_ft(num_steps=2), [REQUEST])),
    "unknown_active_edit": (EditNotFoundError, lambda e: e.set_active_edits(["default", "nope"])),
    "delete_unknown_edit": (EditNotFoundError, lambda e: e.delete_edit("nope")),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
class TestFTEdits:
    @pytest.mark.parametrize(
        "variant, target_module",
        [("ft_m", "mlp_out"), ("ft_m", "mlp_in"), ("ft_m", "attn_out"), ("ft_l", "mlp_out"), ("ft_l", "attn_out")],
    )
    def test_edit_raises_target_probability(self, arch, variant, target_module):
        model = tiny_model(arch)
        base_state = state_copy(model)
        before = target_log_prob(model, REQUEST.filled_prompt, REQUEST.target_new)
        config = fast_ft(variant=variant, target_module=target_module)
        edited = EditedModel(model, TOKENIZER).add_edits(config, [REQUEST])
        after = target_log_prob(edited, REQUEST.filled_prompt, REQUEST.target_new)

        edit = edited.get_edit()
        assert sorted(edit.components) == sorted(ft_paths(edited, target_module))
        assert sorted(edited._hooks) == sorted(edit.components)
        assert all(len(comps) == 1 and isinstance(comps[0], DenseDelta) for comps in edit.components.values())
        assert_same_state(model, base_state)  # the change lives beside the weights
        if variant == "ft_m":
            assert after > before + 0.05
        else:  # FT-L: every weight moves by at most the L-infinity bound, and the target still gains
            assert after > before
            bound = edit.config.norm_constraint
            assert bound == 5e-4
            assert all(c.delta.abs().max() <= bound + 1e-9 for comps in edit.components.values() for c in comps)
        assert edit.config.variant == variant and edit.stats["ft_steps"] >= 1

    def test_disable_and_unload_restore_base_exactly(self, arch):
        model = tiny_model(arch)
        base_state, base_logits, base_hooks = state_copy(model), logits(model), forward_hooks(model)
        inputs = model_inputs(model, [REQUEST.filled_prompt])
        inputs.pop("decoder_input_ids", None)
        base_generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)

        edited = EditedModel(model, TOKENIZER).add_edits(fast_ft(), [REQUEST])
        assert edited.config is model.config and edited.get_base_model() is model  # attribute pass-through
        edited_logits = logits(edited)
        assert not torch.equal(edited_logits, base_logits)
        with edited.disable_edits():
            assert torch.equal(logits(edited), base_logits)
            assert torch.equal(edited.generate(**inputs, max_new_tokens=3, do_sample=False), base_generated)
            assert_same_state(model, base_state)
        assert torch.equal(logits(edited), edited_logits)

        base = edited.unload()
        assert base is model
        assert torch.equal(logits(base), base_logits)
        assert_same_state(base, base_state)
        assert forward_hooks(base) == base_hooks and not edited._hooks
        assert edited.edit_names == [] and edited.active_edits == []

    def test_save_and_reload_gives_identical_outputs(self, arch, tmp_path):
        edited = edited_tiny(arch)
        sizes = edited.save_pretrained(tmp_path / "edit")
        assert set(sizes) == {"default"}

        fresh = tiny_model(arch)
        fresh_state = state_copy(fresh)
        loaded = EditedModel.from_pretrained(fresh, tmp_path / "edit", tokenizer=TOKENIZER)
        assert torch.equal(logits(loaded), logits(edited))
        assert loaded.get_edit().requests == edited.get_edit().requests
        assert loaded.get_edit().config == edited.get_edit().config
        assert sorted(loaded._hooks) == sorted(edited.get_edit().components)
        assert_same_state(loaded.unload(), fresh_state)

    def test_load_onto_another_base_raises(self, arch, tmp_path):
        edited_tiny(arch).save_pretrained(tmp_path / "edit")
        other = tiny_model(arch, seed=1)
        other_state, other_hooks = state_copy(other), forward_hooks(other)
        with pytest.raises(BaseModelMismatchError, match="differs from the one"):
            EditedModel.from_pretrained(other, tmp_path / "edit", tokenizer=TOKENIZER)
        assert_same_state(other, other_state)
        assert forward_hooks(other) == other_hooks

        # Onto an EditedModel that holds an edit already: it stays exactly as it was.
        holder = edited_tiny(arch, seed=1)
        snapshot = Snapshot(holder)
        with pytest.raises(BaseModelMismatchError):
            holder.load_edit(tmp_path / "edit", edit_name="loaded")
        snapshot.assert_unchanged()

    def test_load_onto_another_architecture_raises(self, arch, tmp_path):
        edited_tiny(arch).save_pretrained(tmp_path / "edit")
        other_arch = "llama" if arch != "llama" else "gpt2"
        other = tiny_model(other_arch)
        other_state = state_copy(other)
        with pytest.raises(BaseModelMismatchError, match=arch):
            EditedModel.from_pretrained(other, tmp_path / "edit", tokenizer=TOKENIZER)
        assert_same_state(other, other_state)
        assert forward_hooks(other) == {}

    def test_merge_and_unmerge(self, arch):
        model = tiny_model(arch)
        base_state, base_logits = state_copy(model), logits(model)
        edited = EditedModel(model, TOKENIZER).add_edits(fast_ft(), [REQUEST])
        paths = sorted(edited.get_edit().components)
        edited_logits = logits(edited)

        edited.merge_edits()
        changed = sorted(n for n, t in model.state_dict().items() if not torch.equal(t, base_state[n]))
        assert changed == [f"{path}.weight" for path in paths]
        torch.testing.assert_close(logits(edited), edited_logits, rtol=1e-4, atol=1e-4)
        with edited.disable_edits():
            assert torch.equal(logits(edited), base_logits)
        torch.testing.assert_close(logits(edited), edited_logits, rtol=1e-4, atol=1e-4)

        edited.unmerge_edits()
        assert_same_state(model, base_state)
        assert torch.equal(logits(edited), edited_logits)

        edited.merge_edits()
        assert_same_state(edited.unload(), base_state)  # unload of a merged model is bit-exact too

    def test_merge_and_unload(self, arch):
        model = tiny_model(arch)
        base_state = state_copy(model)
        edited = EditedModel(model, TOKENIZER).add_edits(fast_ft(target_module="mlp_in"), [REQUEST])
        paths = sorted(edited.get_edit().components)
        edited_logits = logits(edited)

        merged = edited.merge_and_unload()
        assert merged is model and forward_hooks(merged) == {} and edited.edit_names == []
        changed = sorted(n for n, t in merged.state_dict().items() if not torch.equal(t, base_state[n]))
        assert changed == [f"{path}.weight" for path in paths]
        torch.testing.assert_close(logits(merged), edited_logits, rtol=1e-4, atol=1e-4)

    def test_stacking_and_named_edits(self, arch):
        model = tiny_model(arch)
        base_logits = logits(model)
        before = [target_log_prob(model, r.filled_prompt, r.target_new) for r in (REQUEST, BATCH[1])]
        edited = EditedModel(model, TOKENIZER).add_edits(fast_ft(), [REQUEST])
        first = {path: comps[0].delta.clone() for path, comps in edited.get_edit().components.items()}

        # Same name, equal config (a fresh object): the second edit is stacked onto the first.
        edited.add_edits(fast_ft(), [BATCH[1]])
        edit = edited.get_edit()
        assert [r.subject for r in edit.requests] == ["Atlantis", "Miles Davis"]
        assert edit.stats["num_edit_calls"] == 2 and edited.edit_names == ["default"]
        assert sorted(edit.components) == sorted(first)
        for path, comps in edit.components.items():
            assert len(comps) == 1 and not torch.equal(comps[0].delta, first[path])
        after = [target_log_prob(edited, r.filled_prompt, r.target_new) for r in (REQUEST, BATCH[1])]
        assert all(a > b for a, b in zip(after, before)), (before, after)

        # Same name, another config: refused, nothing changes.
        snapshot = Snapshot(edited)
        with pytest.raises(EditConfigError, match="another config"):
            edited.add_edits(fast_ft(target_module="attn_out"), [BATCH[2]])
        snapshot.assert_unchanged()

        # A second name works with another config, and both are active.
        edited.add_edits(fast_ft(target_module="attn_out"), [BATCH[2]], edit_name="second")
        assert edited.edit_names == ["default", "second"] and edited.active_edits == ["default", "second"]
        both = logits(edited)
        edited.set_active_edits(["second"])
        only_second = logits(edited)
        assert not torch.equal(only_second, both)
        edited.set_active_edits([])
        assert torch.equal(logits(edited), base_logits)
        edited.set_active_edits(["default", "second"])
        assert torch.equal(logits(edited), both)

        edited.delete_edit("default")
        assert edited.edit_names == ["second"] and edited.active_edits == ["second"]
        assert sorted(edited._hooks) == sorted(edited.get_edit("second").components)
        assert torch.equal(logits(edited), only_second)
        with pytest.raises(EditNotFoundError):
            edited.get_edit("default")

    def test_batch_edit(self, arch):
        model = tiny_model(arch)
        before = [target_log_prob(model, r.filled_prompt, r.target_new) for r in BATCH]
        edited = EditedModel(model, TOKENIZER).add_edits(fast_ft(batch_size=2, num_steps=10), BATCH)
        after = [target_log_prob(edited, r.filled_prompt, r.target_new) for r in BATCH]
        assert len(edited.get_edit().requests) == 3
        assert all(a > b for a, b in zip(after, before)), (before, after)

    def test_get_edited_model(self, arch):
        model = tiny_model(arch)
        edited = get_edited_model(model, fast_ft(), REQUEST, tokenizer=TOKENIZER, edit_name="x")
        assert isinstance(edited, EditedModel) and edited.edit_names == ["x"]
        assert get_edited_model(edited, fast_ft(), [BATCH[1]], edit_name="y") is edited
        assert edited.active_edits == ["x", "y"]

    def test_dense_artifact_holds_the_matrix(self, arch, tmp_path):
        edited = edited_tiny(arch)
        sizes = edited.save_pretrained(tmp_path / "edit")
        [(path, [component])] = edited.get_edit().components.items()
        shape = linear_shape(edited.base_model.get_submodule(path))
        tensors = load_file(str(tmp_path / "edit" / "edit_weights.safetensors"))
        assert list(tensors) == [f"{path}.0.delta"]
        saved = tensors[f"{path}.0.delta"]
        assert tuple(saved.shape) == tuple(shape) and saved.dtype == torch.float32
        assert torch.equal(saved, component.delta)
        files = sum(f.stat().st_size for f in (tmp_path / "edit").iterdir())
        assert sizes == {"default": files}
        assert sizes["default"] > shape[0] * shape[1] * 4

    def test_fp32_deltas_on_bf16_model(self, arch, tmp_path):
        model = tiny_model(arch).to(torch.bfloat16)
        base_state, base_logits = state_copy(model), logits(model)
        before = target_log_prob(model, REQUEST.filled_prompt, REQUEST.target_new)
        edited = EditedModel(model, TOKENIZER).add_edits(fast_ft(), [REQUEST])
        assert target_log_prob(edited, REQUEST.filled_prompt, REQUEST.target_new) > before + 0.05
        components = [c for comps in edited.get_edit().components.values() for c in comps]
        assert all(c.delta.dtype == torch.float32 for c in components)
        assert logits(edited).dtype == torch.bfloat16

        edited.save_pretrained(tmp_path / "edit")
        assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "edit" / WEIGHTS)).values())
        with edited.disable_edits():
            assert torch.equal(logits(edited), base_logits)
        edited.merge_edits()
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        edited.unmerge_edits()
        assert_same_state(edited.unload(), base_state)

        # An edit saved from the fp32 model applies to its bf16 copy (the fingerprint allows rounding).
        edited_tiny(arch).save_pretrained(tmp_path / "fp32")
        loaded = EditedModel.from_pretrained(tiny_model(arch).to(torch.bfloat16), tmp_path / "fp32")
        assert loaded.edit_names == ["default"]

    def test_bad_input_raises_and_changes_nothing(self, arch):
        edited = edited_tiny(arch)
        snapshot = Snapshot(edited)
        for case, (error, call) in BAD_EDITS.items():
            if case == "prompt_too_long" and arch == "t5":
                continue  # T5's relative positions have no maximum length
            with pytest.raises(error) as info:
                call(edited)
            assert type(info.value) is error, case  # the typed error itself, not a wrapper or a parent class
            try:
                snapshot.assert_unchanged()
            except AssertionError as failure:
                raise AssertionError(f"{case} changed the model: {failure}") from failure
        assert edited.edit_names == ["default"]

    def test_failing_editor_leaves_nothing(self, arch, dummy_method):
        edited = edited_tiny(arch)
        snapshot = Snapshot(edited)
        with pytest.raises(RuntimeError, match="boom"):
            edited.add_edits(DummyConfig(), [REQUEST], edit_name="failing")
        snapshot.assert_unchanged()

        # On a model with no edit at all, not a single hook is left.
        model = tiny_model(arch)
        fresh = EditedModel(model, TOKENIZER)
        with pytest.raises(RuntimeError, match="boom"):
            fresh.add_edits(DummyConfig(), [REQUEST])
        assert forward_hooks(model) == {} and fresh._hooks == {} and fresh.edit_names == []

    def test_diverging_edit_raises(self, arch, monkeypatch):
        real_loss = FTEditor.loss
        calls = []

        def nan_on_second_step(self, batch, logits):
            calls.append(1)
            loss = real_loss(self, batch, logits)
            return loss * float("nan") if len(calls) > 1 else loss

        edited = edited_tiny(arch)
        snapshot = Snapshot(edited)
        monkeypatch.setattr(FTEditor, "loss", nan_on_second_step)
        with pytest.raises(EditFailedError, match="nan"):
            edited.add_edits(fast_ft(), [REQUEST], edit_name="diverged")
        snapshot.assert_unchanged()
        assert len(calls) == 2

    def test_non_finite_update_raises(self, arch, monkeypatch):
        class NaNEditor(FailingEditor):
            def compute_components(self, edited_model, requests):
                path = edited_model.layout.mlp_out_path(1)
                shape = linear_shape(edited_model.base_model.get_submodule(path))
                return {path: DenseDelta(torch.full(shape, float("nan")))}

        monkeypatch.setitem(EDIT_METHODS, "dummy", (DummyConfig, NaNEditor))
        edited = edited_tiny(arch)
        snapshot = Snapshot(edited)
        with pytest.raises(EditFailedError, match="NaN or Inf"):
            edited.add_edits(DummyConfig(), [REQUEST], edit_name="nan")
        snapshot.assert_unchanged()

    def test_config_of_another_method(self, arch, monkeypatch):
        with pytest.raises(EditConfigError, match="FTConfig"):
            FTEditor(DummyConfig())
        monkeypatch.setitem(EDIT_METHODS, "dummy", (DummyConfig, FTEditor))  # a method wired to the wrong editor
        edited = edited_tiny(arch)
        snapshot = Snapshot(edited)
        with pytest.raises(EditConfigError, match="DummyConfig"):
            edited.add_edits(DummyConfig(), [REQUEST], edit_name="dummy")
        snapshot.assert_unchanged()


WEIGHTS = "edit_weights.safetensors"


def test_config_validation():
    with pytest.raises(EditConfigError, match="variant"):
        FTConfig(variant="ft_x")
    with pytest.raises(EditConfigError, match="target_module"):
        FTConfig(target_module="embeddings")
    with pytest.raises(EditConfigError, match="lr"):
        FTConfig(lr=float("inf"))
    with pytest.raises(EditConfigError, match="num_steps"):
        FTConfig(num_steps=0)
    with pytest.raises(EditConfigError, match="non-negative"):
        FTConfig(layers=[-1])
    assert FTConfig(layers=3).layers == [3]
    assert FTConfig(variant="ft_l").norm_constraint == 5e-4 and FTConfig().norm_constraint is None


def test_an_int_given_for_a_float_field_is_stored_as_a_float():
    """`--set lr=1` or `"lr": 1` in a JSON file gives the config that 1.0 gives: same saved JSON and run labels."""
    from hf_knowedit.config import build_config

    cases = [("ft", {"lr": 1, "norm_constraint": 2}), ("tpatcher", {"key_scale": 40, "max_value_scale": 4})]
    for method, overrides in cases:
        config = build_config(method, overrides=overrides)
        for key, value in overrides.items():
            assert type(getattr(config, key)) is float and getattr(config, key) == value
            assert type(config.to_dict()[key]) is float
    assert type(FTConfig(num_steps=3).num_steps) is int  # int fields stay ints
    with pytest.raises(EditConfigError, match="key_scale"):
        build_config("tpatcher", overrides={"key_scale": True})  # a bool is not a number here
    with pytest.raises(EditConfigError, match="lr is too large for a float"):
        FTConfig(lr=10**400)


def test_string_annotations_of_an_outside_config_still_turn_ints_into_floats(tmp_path, monkeypatch):
    """A config class from a module with `from __future__ import annotations` has string field types; its float
    fields (`float`, `float | None`, `Optional[float]`) store ints as floats all the same, its int fields stay ints,
    also in a subclass written elsewhere, and a field typed with a name imported for type checkers only is left as
    given."""
    (tmp_path / "outside_method.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from typing import TYPE_CHECKING, ClassVar, Optional\n"
        "from hf_knowedit import EditConfig\n"
        "if TYPE_CHECKING:\n"
        "    from decimal import Decimal\n\n"
        "@dataclass\n"
        "class OutsideConfig(EditConfig):\n"
        "    edit_type: ClassVar[str] = 'outside'\n"
        "    scale: float = 0.5\n"
        "    cap: float | None = None\n"
        "    floor: Optional[float] = None\n"
        "    steps: int = 2\n"
        "    ratio: int | float = 1\n"
        "    exact: Decimal | None = None\n"  # a name type checkers see, not the module: not a float field
    )
    # a subclass in a module that does not import Optional: the inherited field resolves in its parent's module
    (tmp_path / "outside_child.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from outside_method import OutsideConfig\n\n"
        "@dataclass\n"
        "class ChildConfig(OutsideConfig):\n"
        "    extra: float = 0.0\n\n"
        "@dataclass\n"
        "class BareConfig(OutsideConfig):\n"
        "    extra: float = 0.0\n\n"
        "del BareConfig.__annotations__\n"  # no class of it keeps its annotations: looked up in its own module
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from outside_child import BareConfig, ChildConfig
    from outside_method import OutsideConfig

    child = ChildConfig(floor=4, extra=1)
    assert type(child.floor) is float and type(child.extra) is float
    assert type(BareConfig(extra=1).extra) is float

    config = OutsideConfig(scale=2, cap=3, floor=4, steps=5, ratio=6, exact=7)
    assert [type(getattr(config, key)) for key in ("scale", "cap", "floor", "steps", "ratio", "exact")] == [
        float, float, float, int, int, int
    ]
    assert config.to_dict()["scale"] == 2.0 and type(config.to_dict()["scale"]) is float


def test_huge_learning_rate_fails_cleanly():
    """On GPT-2, FT with an absurd learning rate overflows to NaN: the edit is refused, the model untouched."""
    edited = edited_tiny("gpt2")
    snapshot = Snapshot(edited)
    with pytest.raises(EditFailedError):
        edited.add_edits(FTConfig(lr=1e30, num_steps=3), [REQUEST], edit_name="huge")
    snapshot.assert_unchanged()


def test_add_edits_leaves_the_callers_config_alone():
    config = fast_ft(num_steps=2)
    edited = EditedModel(tiny_model("gpt2"), TOKENIZER).add_edits(config, [REQUEST])
    assert config == fast_ft(num_steps=2)
    assert edited.get_edit().config is not config
    assert edited.get_edit().config.base_model_name_or_path is not None



def test_edit_keeps_the_callers_gradients_and_grad_flags():
    model = tiny_model("llama")
    model.train()
    model(**TOKENIZER("The capital of Atlantis is", return_tensors="pt"), labels=TOKENIZER(
        "The capital of Atlantis is", return_tensors="pt")["input_ids"]).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads
    get_edited_model(model, fast_ft(), [REQUEST], tokenizer=TOKENIZER)
    after = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert after.keys() == grads.keys()
    assert all(torch.equal(after[name], grads[name]) for name in grads)
    assert all(p.requires_grad for p in model.parameters()) and model.training
