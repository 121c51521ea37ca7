"""SERAC on tiny gpt2, llama and t5 models: per-prompt routing to the counterfactual model, exact base outputs out of
scope, artifacts, sequential edits, bad artifacts, training the scope classifier (API and command line); and every
ready config under editing_configs/ loads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_knowedit import (
    ArtifactError,
    BaseModelMismatchError,
    EditConfig,
    EditConfigError,
    EditedModel,
    EditRequest,
    load_model_and_tokenizer,
)
from hf_knowedit.artifacts import file_sha256
from hf_knowedit.methods.serac import SERACConfig, SERACMemory
from hf_knowedit.scoring import BatchScorer
from hf_knowedit.training import (
    EditorTrainingArguments,
    TrainedEditor,
    editor_directory,
    editor_identity,
    load_editor_for,
    train_editor,
)

from .helpers import TOKENIZER
from .test_side_memory import logits
from .tiny_models import tiny_model


ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["gpt2", "llama", "t5"]
REQUEST = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
SECOND = EditRequest(prompt="{} plays the instrument", subject="Miles Davis", target_new="violin")
IN_SCOPE = [REQUEST.filled_prompt, "The capital city of Atlantis is"]
OUT_OF_SCOPE = "Nobody expected the weather to"
UNTRAINED = SERACConfig(editor="untrained")

# Synthetic requests for training: three relations, rephrases, and locality prompts about other people.
NAMES = ["Anna", "Boris", "Chen", "Dara", "Emil", "Fatou", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mira",
         "Nils", "Omar", "Pia", "Quin", "Rosa", "Sven", "Tara", "Uma", "Vic", "Wim", "Xena", "Yuri", "Zoe"]
OTHERS = ["Albert", "Beatrice", "Carlos", "Dmitri", "Elena", "Farid"]
RELATIONS = [
    ("The favourite colour of {} is", "{} likes the colour", "red"),
    ("{} was born in the city of", "The birthplace of {} is the city of", "Oslo"),
    ("The mother tongue of {} is", "{} grew up speaking", "Finnish"),
]


def synthetic_request(i: int) -> EditRequest:
    prompt, rephrase, target = RELATIONS[i % len(RELATIONS)]
    name = NAMES[i]
    return EditRequest(prompt=prompt, subject=name, target_new=target, rephrase_prompts=[rephrase.format(name)],
                       locality=[{"prompt": prompt.format(OTHERS[i % len(OTHERS)]), "answer": "unknown"}])


SYNTHETIC = [synthetic_request(i) for i in range(len(NAMES))]
TRAIN, HELD_OUT = SYNTHETIC[:20], SYNTHETIC[20:]


def edited(arch, requests=(REQUEST,), config=UNTRAINED, seed=0):
    return EditedModel(tiny_model(arch, seed), TOKENIZER).add_edits(config, list(requests))


def memory(model) -> SERACMemory:
    (component,) = model.get_edit().components[""]
    return component


def close(a, b, rtol=1e-4):
    return torch.allclose(a, b, rtol=0, atol=rtol * b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_in_scope_prompts_go_to_the_counterfactual_model_and_others_to_the_base(arch):
    model = edited(arch)
    context = memory(model).context(0)
    assert context == "New Fact: The capital of Atlantis is Paris\n"
    assert memory(model).route(model, [*IN_SCOPE, OUT_OF_SCOPE]) == [context, context, None]
    for prompt in IN_SCOPE:
        got = logits(model, [prompt])
        with model.disable_edits():
            plain, with_context = logits(model, [prompt]), logits(model, [context + prompt])
        assert not torch.allclose(got, plain)
        if model.config.is_encoder_decoder:  # the edit goes before the prompt on the encoder side
            assert close(got, with_context)
        else:
            assert close(got[0], with_context[0, -got.shape[1]:])
    with model.disable_edits():
        base_out = logits(model, [OUT_OF_SCOPE])
    assert torch.equal(logits(model, [OUT_OF_SCOPE]), base_out)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_is_routed_per_prompt(arch):
    model = edited(arch)
    prompts = [IN_SCOPE[0], OUT_OF_SCOPE, IN_SCOPE[1]]
    mixed = logits(model, prompts)
    for row, prompt in enumerate(prompts):
        alone = logits(model, [prompt])[0]
        assert close(mixed[row, : alone.shape[0]], alone), (arch, prompt)


def test_the_scorer_keeps_length_sorted_batches_under_serac():
    """SERAC's contexts are one short fact each (`shares_long_contexts` False): the scorer does not group prompts by
    context but sorts them by length, each batch runs its rows (each in-scope prompt after its own fact) in one pass,
    and the scores are those of scoring each prompt alone."""
    model = edited("llama", [REQUEST, SECOND])
    prompts = ["Miles Davis plays the instrument", "Atlantis is", IN_SCOPE[0], OUT_OF_SCOPE]
    targets = [" violin", " big", " Paris", " change"]
    assert model.context_groups(prompts) is None
    rows = []
    hook = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(TOKENIZER.batch_decode(kwargs["input_ids"], skip_special_tokens=True)),
        with_kwargs=True)
    try:
        together = BatchScorer(model, TOKENIZER, batch_size=2).score_targets(prompts, targets)
    finally:
        hook.remove()
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    # per batch of two: the scope classifier's features of its rows, then the rows routed (the in-scope one after its
    # fact), in one pass each
    assert [len(batch) for batch in rows] == [2, 2, 2, 2]
    for routed, indices in zip(rows[1::2], (by_length[:2], by_length[2:])):
        assert all(any(row.endswith(prompts[i] + targets[i]) for row in routed) for i in indices)
    assert sum(row.startswith("New Fact:") for batch in rows[1::2] for row in batch) == 2
    alone = BatchScorer(model, TOKENIZER, batch_size=1).score_targets(prompts, targets)
    for a, b in zip(together, alone):
        assert a.predicted_ids == b.predicted_ids and a.mean_log_prob == pytest.approx(b.mean_log_prob, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_reload_and_unload(arch, tmp_path):
    model = tiny_model(arch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    probes = [IN_SCOPE[0], OUT_OF_SCOPE]
    base_out = logits(model, probes)
    edit = EditedModel(model, TOKENIZER).add_edits(UNTRAINED, [REQUEST, SECOND])
    out = logits(edit, probes)
    assert not torch.equal(out, base_out)
    edit.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "edit_config.json").read_text())
    (entry,) = saved["edit_modules"][""]
    assert entry["kind"] == "serac_memory"
    assert [e["target_new"] for e in entry["meta"]["entries"]] == ["Paris", "violin"]
    assert "classifier.projection.weight" in entry["tensors"] and "keys" in entry["tensors"]
    reloaded = EditedModel.from_pretrained(tiny_model(arch), tmp_path, tokenizer=TOKENIZER)
    assert torch.equal(logits(reloaded, probes), out)
    base = edit.unload()
    assert torch.equal(logits(base, probes), base_out)
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    assert not any(m._forward_hooks for m in base.modules())


def test_sequential_edits_accumulate_the_memory():
    model = edited("gpt2")
    model.add_edits(UNTRAINED, [SECOND])
    component = memory(model)
    assert len(component) == 2 and len(model.get_edit().requests) == 2 and component.keys.shape[0] == 2
    routes = component.route(model, [REQUEST.filled_prompt, SECOND.filled_prompt, OUT_OF_SCOPE])
    assert routes == [component.context(0), component.context(1), None]
    assert "violin" in routes[1]
    # Another threshold is another classifier: a second edit under another name, not merged into this memory.
    model.add_edits(SERACConfig(editor="untrained", threshold=0.99), [SECOND], edit_name="strict")
    assert len(memory(model)) == 2 and model.active_edits == ["default", "strict"]


def test_missing_editor_says_how_to_train_one():
    with pytest.raises(EditConfigError, match="train-editor --method serac"):
        edited("gpt2", config=SERACConfig())
    with pytest.raises(EditConfigError, match="layers"):
        SERACConfig(layers=[1, 2])
    with pytest.raises(EditConfigError, match="threshold"):
        SERACConfig(threshold=2.0)


def test_artifact_from_another_base_is_refused(tmp_path):
    edited("llama").save_pretrained(tmp_path)
    for other in (tiny_model("llama", seed=1), tiny_model("gpt2")):
        with pytest.raises(BaseModelMismatchError):
            EditedModel.from_pretrained(other, tmp_path, tokenizer=TOKENIZER)


def rewrite_weights(directory: Path, change) -> None:
    """Rewrite the saved tensors with `change(tensors)` and record the new checksum, as a consistent artifact would."""
    weights = directory / "edit_weights.safetensors"
    save_file(change(load_file(str(weights))), str(weights))
    config = json.loads((directory / "edit_config.json").read_text())
    config["weights_sha256"] = file_sha256(weights)
    (directory / "edit_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage", ["truncated_memory", "keys_of_other_size", "projection_of_other_size",
                                    "truncated_file", "truncated_config"])
def test_damaged_artifact_raises_artifact_error(damage, tmp_path):
    edited("gpt2", [REQUEST, SECOND]).save_pretrained(tmp_path)
    if damage == "truncated_memory":
        rewrite_weights(tmp_path, lambda t: {**t, ".0.keys": t[".0.keys"][:1]})
    elif damage == "keys_of_other_size":
        rewrite_weights(tmp_path, lambda t: {**t, ".0.keys": torch.cat([t[".0.keys"]] * 2, dim=1)})
    elif damage == "projection_of_other_size":
        def grow(t):
            t = dict(t)
            for name in list(t):
                if name.startswith(".0.classifier.") or name == ".0.keys":
                    value = t[name]
                    t[name] = torch.cat([value] * 2, dim=-1) if value.dim() else value
                    if name.endswith("projection.weight"):
                        t[name] = torch.cat([t[name]] * 2, dim=0)
            return t
        rewrite_weights(tmp_path, grow)  # a consistent classifier for a 64-wide model, refused on this 32-wide one
    elif damage == "truncated_file":
        weights = tmp_path / "edit_weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:50])
    else:
        config = tmp_path / "edit_config.json"
        config.write_text(config.read_text()[:300])
    with pytest.raises(ArtifactError):
        EditedModel.from_pretrained(tiny_model("gpt2"), tmp_path, tokenizer=TOKENIZER)


def balanced_accuracy_and_auc(config, model) -> tuple[float, float]:
    spec, classifier = load_editor_for(config, model, TOKENIZER)
    metrics = spec.validation_metrics(classifier, HELD_OUT + TRAIN[:4])
    return (metrics["in_scope_accuracy"] + metrics["out_of_scope_accuracy"]) / 2, metrics["auc"]


@pytest.fixture(scope="module")
def trained_editor(tmp_path_factory):
    arguments = EditorTrainingArguments(batch_size=8, learning_rate=1e-2, validation_size=0, seed=0)
    result = train_editor("serac", tiny_model("gpt2"), TOKENIZER, TRAIN, tmp_path_factory.mktemp("serac"),
                          config=SERACConfig(), args=arguments, max_steps=40)
    assert result.status == "completed", result.message
    return result.editor_dir


def test_trained_classifier_separates_scope_better_than_untrained(trained_editor):
    model = tiny_model("gpt2")
    untrained_accuracy, untrained_auc = balanced_accuracy_and_auc(UNTRAINED, model)
    trained_accuracy, trained_auc = balanced_accuracy_and_auc(SERACConfig(editor=str(trained_editor)), model)
    assert trained_accuracy > untrained_accuracy + 0.05, (trained_accuracy, untrained_accuracy)
    assert trained_auc >= untrained_auc, (trained_auc, untrained_auc)


def test_trained_classifier_edits_and_is_stored_in_the_edit(trained_editor, tmp_path):
    config = SERACConfig(editor=str(trained_editor))
    model = edited("gpt2", HELD_OUT, config=config)
    component = memory(model)
    trained = TrainedEditor.from_pretrained(trained_editor, model=tiny_model("gpt2"))
    assert component.threshold == pytest.approx(float(trained.state_dict["threshold"]))
    assert torch.equal(component.classifier.projection.weight, trained.state_dict["projection.weight"])
    probes = [HELD_OUT[0].filled_prompt, OUT_OF_SCOPE]
    out = logits(model, probes)
    model.save_pretrained(tmp_path)
    reloaded = EditedModel.from_pretrained(tiny_model("gpt2"), tmp_path, tokenizer=TOKENIZER)
    assert torch.equal(logits(reloaded, probes), out)
    with pytest.raises(BaseModelMismatchError):
        edited("gpt2", HELD_OUT, config=config, seed=1)
    with pytest.raises(BaseModelMismatchError, match="layers"):
        edited("gpt2", HELD_OUT, config=SERACConfig(editor=str(trained_editor), layers=[0]))


def test_train_editor_command_line(tmp_path, capsys):
    from hf_knowedit.cli import main  # `hf-knowedit`

    model_dir = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(model_dir)
    TOKENIZER.save_pretrained(model_dir)
    records = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "ground_truth": "x",
                "rephrase_prompt": r.rephrase_prompts[0], "locality_prompt": r.locality[0].prompt,
                "locality_ground_truth": "unknown"} for r in SYNTHETIC]
    dataset = tmp_path / "counterfact-train.json"
    dataset.write_text(json.dumps(records))
    output = tmp_path / "run"
    code = main(["train-editor", "--method", "serac", "--model", str(model_dir), "--dataset", str(dataset),
                 "--output", str(output), "--max-steps", "3", "--set", "batch_size=4"])
    assert code == 0 and (output / "editor" / "editor_weights.safetensors").is_file()
    assert f"Editor weights SHA-256 {editor_identity(output)['sha256']} (by content" in capsys.readouterr().out
    base, tokenizer = load_model_and_tokenizer(str(model_dir))
    edit = EditedModel(base, tokenizer).add_edits(SERACConfig(editor=str(output)), [REQUEST])
    assert memory(edit).route(edit, [REQUEST.filled_prompt])[0] is not None


CONFIG_FILES = sorted((ROOT / "editing_configs").glob("*/*.json"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_ready_configs_load(path):
    data = json.loads(path.read_text())
    config = EditConfig.from_dict(data)
    assert config.edit_type == path.parent.name == data["edit_type"]
    assert {k: v for k, v in config.to_dict().items() if k in data} == data
    editor = data.get("editor")
    if editor and editor != "untrained":  # a trained editor is only needed to use the config, not to load it
        try:  # a checkout has the editor's config and training log (in git), its weights only once trained here
            editor_directory(ROOT / editor)
        except ArtifactError:
            pytest.skip(f"{editor} is not trained here; the config loads, but cannot be used")
        assert TrainedEditor.from_pretrained(ROOT / editor).method == data["edit_type"]
