"""The editor-training loop: exact resume, checkpoints without pickle, NaN stops, bad data, the command line."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from hf_knowedit import EditConfigError, EditRequest, EditRequestError
from hf_knowedit.methods.mend import MENDConfig, MENDTrainingSpec
from hf_knowedit.training import EditorTrainingArguments, latest_checkpoint, train_editor
from hf_knowedit.training.cli import add_train_editor_parser, split_overrides

from .helpers import TOKENIZER
from .test_learned_editors import TRAIN
from .tiny_models import tiny_model


CONFIG = MENDConfig(c_edit=1.0, c_loc=0.1)


def run(output_dir, max_steps, resume=False, **kwargs):
    arguments = EditorTrainingArguments(batch_size=4, learning_rate=1e-2, save_every=2, **kwargs)
    return train_editor("mend", tiny_model("gpt2"), TOKENIZER, TRAIN, output_dir, config=CONFIG, args=arguments,
                        max_steps=max_steps, resume=resume)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 3)
    resumed = run(tmp_path / "resumed", 6, resume=True)
    assert straight.steps == resumed.steps == 6
    for name in ("editor_weights.safetensors",):
        a, b = load_file(str(straight.editor_dir / name)), load_file(str(resumed.editor_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "optimizer.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "resumed") / "optimizer.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    result = run(tmp_path, 4, keep_checkpoints=1)
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-00000004"] and result.last_checkpoint == checkpoints[0]
    names = sorted(p.name for p in checkpoints[0].iterdir())
    assert names == ["README.md", "editor_config.json", "editor_weights.safetensors", "optimizer.safetensors",
                     "trainer_state.json"]
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"] == 4
    with pytest.raises(EditConfigError, match="another config"):
        train_editor("mend", tiny_model("gpt2"), TOKENIZER, TRAIN, tmp_path, config=MENDConfig(rank=4),
                     max_steps=6, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, caplog):
    original = MENDTrainingSpec.training_loss
    calls = []

    def poisoned(self, trainable, requests):
        loss, metrics = original(self, trainable, requests)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), metrics

    monkeypatch.setattr(MENDTrainingSpec, "training_loss", poisoned)
    result = run(tmp_path, 10)
    assert result.status == "diverged" and not result.ok and result.steps == 4
    assert result.last_checkpoint.name == "step-00000004" and result.editor_dir is None
    assert not (tmp_path / "editor").exists()
    assert "diverged at step 5" in caplog.text and "step-00000004" in result.message
    weights = load_file(str(result.last_checkpoint / "editor_weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_requests_without_locality_need_batches_of_two(tmp_path):
    bare = [EditRequest(prompt="{} likes", subject=f"P{i}", target_new="tea") for i in range(4)]
    with pytest.raises(EditRequestError, match="locality"):
        train_editor("mend", tiny_model("gpt2"), TOKENIZER, bare, tmp_path, args=EditorTrainingArguments(batch_size=1),
                     max_steps=1)
    result = train_editor("mend", tiny_model("gpt2"), TOKENIZER, bare, tmp_path,
                          args=EditorTrainingArguments(batch_size=2), max_steps=1)
    assert result.status == "completed"


def test_time_budget_stops_and_saves(tmp_path):
    result = run(tmp_path, None, max_minutes=1e-4)
    assert result.status == "time_budget" and result.steps == 1 and (result.editor_dir / "editor_config.json").is_file()


def test_command_line_arguments():
    parser = argparse.ArgumentParser()
    add_train_editor_parser(parser.add_subparsers())
    args = parser.parse_args(["train-editor", "--method", "ke", "--dataset", "d.json", "--output", "out",
                              "--max-minutes", "10", "--resume", "--set", "learning_rate=1e-3",
                              "--set", "layers=[1,2]"])
    config, arguments = split_overrides(args.method, args.overrides)
    assert config.layers == [1, 2] and arguments.learning_rate == 1e-3 and args.resume and args.max_minutes == 10
    with pytest.raises(EditConfigError, match="neither"):
        split_overrides("mend", ["no_such_field=1"])
