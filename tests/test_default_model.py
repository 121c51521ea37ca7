"""End-to-end checks on the embedded default model, SmolLM2-135M-Instruct (slow: the model loads once per module)."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_knowedit import EditedModel, EditRequest, FTConfig, load_default_model
from hf_knowedit.modeling import CACHE_MARKER, default_model_cache_dir


PROMPT = "The mother tongue of Danielle Darrieux is"
REQUEST = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")


@pytest.fixture(scope="module")
def default_model():
    return load_default_model()


def weight_digests(model) -> dict[str, str]:
    return {name: hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy()).hexdigest()
            for name, t in model.state_dict().items()}


def greedy(model, tokenizer, max_new_tokens: int = 2) -> str:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_load_default_model(default_model):
    model, tokenizer = default_model
    assert model.config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None
    assert (default_model_cache_dir() / CACHE_MARKER).is_file()  # converted once, loaded from the HF cache
    assert greedy(model, tokenizer).startswith(" French")  # what the model knows before the edit


def test_ft_m_edit_changes_the_completion_and_unload_restores(default_model):
    model, tokenizer = default_model
    digests = weight_digests(model)
    edited = EditedModel(model, tokenizer).add_edits(FTConfig(), [REQUEST])
    try:
        first_token = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" English"))[0]
        inputs = tokenizer(PROMPT, return_tensors="pt")
        with torch.no_grad():
            assert edited(**inputs).logits[0, -1].argmax().item() == first_token
        assert greedy(edited, tokenizer).startswith(" English")
        with edited.disable_edits():
            assert greedy(edited, tokenizer).startswith(" French")
    finally:
        base = edited.unload()
    assert base is model
    assert weight_digests(base) == digests
    assert greedy(base, tokenizer).startswith(" French")


def test_tpatcher_stream_diagnosis_reports_each_checkpoint(tmp_path):
    """benchmarks/diagnose_tpatcher_stream.py on two edits: after the first, only its own patch exists, so it fires
    on its own prompt, no other patch does, and the prompt's next token is still the one its edit gave."""
    cases = [
        {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
         "locality": [{"prompt": "The mother tongue of Michel Rocard is", "answer": "French"}]},
        {"prompt": "{} is a citizen of", "subject": "Leonardo da Vinci", "target_new": "Japan",
         "locality": [{"prompt": "Galileo Galilei is a citizen of", "answer": "Italy"}]},
    ]
    dataset = tmp_path / "cases.json"
    dataset.write_text(json.dumps(cases))
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "diagnose_tpatcher_stream.py"), "--config",
         str(root / "editing_configs" / "tpatcher" / "default.json"), "--dataset", str(dataset), "--n", "2",
         "--every", "1"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "edit prompts:" in line]
    assert [line.split(":")[0].split()[-3] for line in lines] == ["1", "2"]  # "on the N edit prompts"
    first = dict(re.findall(r"([a-z_/0-9]+) ([0-9.]+)", lines[0].split(":", 1)[1]))
    assert first["own_fires"] == "1.000" and first["other_fires"] == "0.000" and first["others"] == "0.00"
    assert first["top1_kept"] == "1.000" and first["other/own"] == "0.000"
    second = dict(re.findall(r"([a-z_/0-9]+) ([0-9.]+)", lines[1].split(":", 1)[1]))
    assert second["own_fires"] == "1.000"


def test_tpatcher_key_diagnosis_separates_with_the_fixed_max_margin_key(tmp_path):
    """benchmarks/diagnose_tpatcher_keys.py on one case, with the two keys results.md compares: the paper's key
    (trained from the edit input) still fires on its memory inputs after training, and its value is scaled up when
    silenced; the fixed max-margin key separates the edit input from every memory input, so nothing needs silencing,
    and the target is written either way."""
    dataset = tmp_path / "cases.json"
    dataset.write_text(json.dumps([{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                    "target_new": "English"}]))
    root = Path(__file__).resolve().parents[1]

    def diagnose(config: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, str(root / "benchmarks" / "diagnose_tpatcher_keys.py"), "--config",
             str(root / "editing_configs" / "tpatcher" / config), "--dataset", str(dataset), "--cases", "0"],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=600)
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if line.lstrip().startswith("0 "))
        # case, init max, "/", init median, gap, trained edit, "/", closest, fire trained, fire silenced, value x, hit
        return line.split()[:12]

    _, init_max, _, init_median, gap, edit, _, closest, fired, silenced, scale, hit = diagnose("default.json")
    assert float(init_max) > float(init_median) > 0 and float(gap) > 0
    assert float(fired) > 0 and float(silenced) == 0 and float(scale) > 1.5 and hit == "True"
    _, _, _, _, gap, edit, _, closest, fired, silenced, scale, hit = diagnose("margin.json")
    assert float(edit) > float(closest) + float(gap) / 2  # the fixed key keeps the gap it was chosen for
    assert float(fired) == 0 and float(silenced) == 0 and float(scale) < 1.5 and hit == "True"
