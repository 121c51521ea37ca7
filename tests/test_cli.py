"""The command line: `hf-knowedit edit` on a tiny model saved to disk, its saved artifact, and its error reporting."""

import json

import pytest
import torch

from hf_knowedit import EditedModel
from hf_knowedit.cli import build_parser, main

from .helpers import save_tiny_model
from .tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


EDIT_ARGS = ["--prompt", "The capital of {} is", "--subject", "Atlantis", "--target-new", "Paris"]


def test_edit_prints_completions_and_saves_a_loadable_artifact(model_dir, tmp_path, capsys):
    output = tmp_path / "edit"
    code = main(["edit", "--method", "ft", "--model", str(model_dir), *EDIT_ARGS, "--output", str(output),
                 "--set", "num_steps=3", "--set", "layers=[1]", "--max-new-tokens", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "before:" in printed and "after:" in printed and "Edit time" in printed
    config = json.loads((output / "edit_config.json").read_text())
    assert config["edit_type"] == "ft" and config["layers"] == [1] and config["num_steps"] == 3
    # The artifact loads onto the same base model and changes its outputs.
    base = tiny_model("llama")
    inputs = tiny_tokenizer()("The capital of Atlantis is", return_tensors="pt")
    with torch.no_grad():
        plain = base(**inputs).logits
        edited = EditedModel.from_pretrained(base, output, tokenizer=tiny_tokenizer())
        assert not torch.equal(edited(**inputs).logits, plain)


def test_edit_with_a_resume_dir_reuses_the_work_of_an_earlier_call(model_dir, tmp_path, capsys):
    args = ["edit", "--method", "kn", "--model", str(model_dir), *EDIT_ARGS, "--set", "steps=2",
            "--resume-dir", str(tmp_path / "work"), "--max-new-tokens", "1"]
    assert main(args) == 0
    assert "0 piece(s) reused, 1 computed" in capsys.readouterr().out
    assert main(args) == 0
    assert "1 piece(s) reused, 0 computed" in capsys.readouterr().out


def test_config_file_and_method_must_agree(model_dir, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"edit_type": "ft", "num_steps": 2}))
    assert main(["edit", "--method", "rome", "--config", str(config), "--model", str(model_dir), *EDIT_ARGS]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "no_such_field=1"], "no field 'no_such_field'"),
        (["--set", "layers=[99]"], "layers"),
        (["--set", "num_steps"], "KEY=VALUE"),
    ],
)
def test_library_errors_are_one_line_with_exit_code_2(model_dir, capsys, extra, message):
    code = main(["edit", "--method", "ft", "--model", str(model_dir), *EDIT_ARGS, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_subject_missing_from_prompt_is_reported(model_dir, capsys):
    args = ["edit", "--model", str(model_dir), "--prompt", "The capital is", "--subject", "Atlantis",
            "--target-new", "Paris"]
    assert main(args) == 2
    assert "does not occur in the prompt" in capsys.readouterr().err


def test_every_registered_method_is_offered():
    from hf_knowedit import EDIT_METHODS

    parser = build_parser()
    edit = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" edit"))
    method = next(a for a in edit._actions if a.dest == "method")
    assert set(method.choices) == set(EDIT_METHODS)
