"""MEND and KE: training beats the untrained editor on unseen requests, artifacts round-trip, mismatches are refused,
and T5 works."""

import pytest
import torch

from hf_knowedit import BaseModelMismatchError, EditConfigError, EditedModel, EditRequest, LowRankDelta
from hf_knowedit.methods.ke import KEConfig
from hf_knowedit.methods.mend import MENDConfig
from hf_knowedit.tokenization import encode_prompt_target
from hf_knowedit.training import EditorTrainingArguments, TrainedEditor, train_editor

from .helpers import TOKENIZER, logits
from .tiny_models import DECODER_ARCHITECTURES, tiny_model


COLOURS = ["red", "blue", "green", "black", "white"]
NAMES = ["Anna", "Boris", "Chen", "Dara", "Emil", "Fatou", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mira",
         "Nils", "Omar", "Pia", "Quin", "Rosa", "Sven", "Tara", "Uma", "Vic"]
REQUESTS = [
    EditRequest(prompt="The favourite colour of {} is", subject=name, target_new=COLOURS[i % len(COLOURS)],
                locality=[{"prompt": "The sky is", "answer": "blue"}])
    for i, name in enumerate(NAMES)
]
TRAIN, HELD_OUT = REQUESTS[:20], REQUESTS[20:]
# Settings under which a few steps of training help reliably on the tiny models (fixed seeds, deterministic order).
SETTINGS = {
    "mend": (MENDConfig, {"c_edit": 1.0, "c_loc": 0.1}, 1e-2, 10),
    "ke": (KEConfig, {"c_edit": 1.0, "c_loc": 0.1, "edit_scale": 0.05}, 1e-2, 20),
}


def target_log_prob(model, request) -> float:
    batch = encode_prompt_target(TOKENIZER, [request.filled_prompt], [request.target_new], model=model)
    with torch.no_grad():
        return float(batch.target_log_probs(model(**batch.model_inputs()).logits)[0])


def mean_gain(arch, config) -> float:
    base = tiny_model(arch)
    gains = []
    for request in HELD_OUT:
        edited = EditedModel(tiny_model(arch), TOKENIZER).add_edits(config, [request])
        gains.append(target_log_prob(edited, request) - target_log_prob(base, request))
    return sum(gains) / len(gains)


def train(method, arch, output_dir, **kwargs):
    config_cls, fields, lr, steps = SETTINGS[method]
    arguments = EditorTrainingArguments(batch_size=4, learning_rate=lr, **kwargs)
    result = train_editor(method, tiny_model(arch), TOKENIZER, TRAIN, output_dir, config=config_cls(**fields),
                          args=arguments, max_steps=steps)
    assert result.status == "completed", result.message
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return {method: train(method, "gpt2", tmp_path_factory.mktemp(method)).editor_dir for method in SETTINGS}


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_training_beats_the_untrained_editor_on_unseen_requests(method, trained):
    config_cls, fields, _, _ = SETTINGS[method]
    untrained = mean_gain("gpt2", config_cls(editor="untrained", **fields))
    learned = mean_gain("gpt2", config_cls(editor=str(trained[method])))
    assert learned > untrained + 0.1, (learned, untrained)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_saved_and_loaded_editor_gives_identical_edits(method, trained, tmp_path):
    config_cls = SETTINGS[method][0]
    editor = TrainedEditor.from_pretrained(trained[method], model=tiny_model("gpt2"))
    editor.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "README.md", "editor_config.json", "editor_weights.safetensors"]
    edits = []
    for source in (trained[method], tmp_path / "copy", trained[method].parent):  # the run's folder works too
        edited = EditedModel(tiny_model("gpt2"), TOKENIZER).add_edits(config_cls(editor=str(source)), HELD_OUT)
        edits.append(edited.get_edit().components)
    for other in edits[1:]:
        for path, (delta,) in edits[0].items():
            assert isinstance(delta, LowRankDelta)
            assert torch.equal(delta.delta_weight(), other[path][0].delta_weight())
    # The edit made with the editor is itself an artifact that reloads exactly.
    edited = EditedModel(tiny_model("gpt2"), TOKENIZER).add_edits(config_cls(editor=str(trained[method])), HELD_OUT)
    edited.save_pretrained(tmp_path / "edit")
    reloaded = EditedModel.from_pretrained(tiny_model("gpt2"), tmp_path / "edit", tokenizer=TOKENIZER)
    assert torch.equal(logits(edited), logits(reloaded))


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_other_base_model_or_layers_are_refused(method, trained):
    config_cls = SETTINGS[method][0]
    source = str(trained[method])
    for model in (tiny_model("llama"), tiny_model("gpt2", seed=1)):
        with pytest.raises(BaseModelMismatchError):
            EditedModel(model, TOKENIZER).add_edits(config_cls(editor=source), HELD_OUT[:1])
    with pytest.raises(BaseModelMismatchError, match="layers"):
        EditedModel(tiny_model("gpt2"), TOKENIZER).add_edits(config_cls(editor=source, layers=[0]), HELD_OUT[:1])


@pytest.mark.parametrize("config_cls", [MENDConfig, KEConfig])
def test_missing_editor_says_how_to_train_one(config_cls):
    with pytest.raises(EditConfigError, match="train-editor"):
        EditedModel(tiny_model("gpt2"), TOKENIZER).add_edits(config_cls(), HELD_OUT[:1])


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_t5_trains_and_edits(method, tmp_path):
    result = train(method, "t5", tmp_path, validation_size=2)
    assert [h for h in result.history if h["split"] == "validation"]
    model = tiny_model("t5")
    before = logits(model)
    edited = EditedModel(model, TOKENIZER).add_edits(SETTINGS[method][0](editor=str(result.editor_dir)), HELD_OUT)
    paths = list(edited.get_edit().components)
    assert paths and all(p.startswith("decoder.block.") and p.endswith("DenseReluDense.wo") for p in paths)
    assert not torch.equal(logits(edited), before)
    with edited.disable_edits():
        assert torch.equal(logits(edited), before)


@pytest.mark.parametrize("arch", [a for a in DECODER_ARCHITECTURES if a != "gpt2"])
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_decoder_architectures_train_and_edit(method, arch, tmp_path):
    """Every decoder-only family trains an editor and edits with it (OPT flattens the tokens inside its MLP)."""
    result = train(method, arch, tmp_path, validation_size=2)
    model = tiny_model(arch)
    before = logits(model)
    edited = EditedModel(model, TOKENIZER).add_edits(SETTINGS[method][0](editor=str(result.editor_dir)), HELD_OUT)
    assert all(isinstance(d, LowRankDelta) for deltas in edited.get_edit().components.values() for d in deltas)
    assert not torch.equal(logits(edited), before)
    with edited.disable_edits():
        assert torch.equal(logits(edited), before)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_edit_gradients_in_chunks_equal_one_pass(arch):
    from hf_knowedit.training.gradients import layer_gradients

    model = tiny_model(arch)
    requests = REQUESTS[:5]
    prompts = [r.filled_prompt + " really" * i for i, r in enumerate(requests)]  # rows of different lengths
    batch = encode_prompt_target(TOKENIZER, prompts, [r.target_new for r in requests], model=model)
    paths = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)][-3:-1]
    whole, chunked = layer_gradients(model, paths, batch, chunk_size=5), layer_gradients(model, paths, batch, 2)
    for path in paths:
        for name in ("inputs", "output_grads"):
            # rows padded to another length sum in another order: float32 differences up to 3e-5 of an element
            torch.testing.assert_close(getattr(chunked[path], name), getattr(whole[path], name), atol=1e-6, rtol=1e-4)
        assert whole[path].output_grads.abs().sum() > 0
        assert torch.equal(chunked[path].request_index, whole[path].request_index)
        assert chunked[path].request_index.unique().tolist() == [0, 1, 2, 3, 4]
