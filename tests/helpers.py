"""Helpers shared by the tests: requests, forward passes, target probabilities, snapshots of a model, and FT edits
counted (or stopped part-way) in evaluation runs."""

import os
from pathlib import Path

import torch

from hf_knowedit import EditRequest, FTConfig
from hf_knowedit.methods.ft.editor import FTEditor

from .tiny_models import tiny_model, tiny_tokenizer


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HF_KNOWEDIT_DATA_DIR", ROOT.parent / "shared" / "data"))
WIKITEXT = SHARED_DATA / "wikitext" / "wikitext-103.valid.tokens"
COUNTERFACT_TRAIN = SHARED_DATA / "counterfact_easyedit" / "counterfact-train.json"


REQUEST = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
BATCH = [
    REQUEST,
    EditRequest(prompt="{} plays the instrument", subject="Miles Davis", target_new="violin"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
]
# One tokenizer for every test: it is only read (building a copy takes a tenth of a second).
TOKENIZER = tiny_tokenizer()
PROBES = ["The capital of Atlantis is", "Miles Davis plays the", "A completely unrelated sentence about"]


def save_tiny_model(directory: Path, arch: str = "llama") -> Path:
    """Save a tiny model and the test tokenizer into `directory`, as a local model folder; returns it."""
    tiny_model(arch).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def fast_ft(**kwargs) -> FTConfig:
    """An FT config that edits a tiny model in a few steps."""
    return FTConfig(**{"num_steps": 8, "lr": 1e-2, **kwargs})


def model_inputs(model, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Padded inputs for `prompts`; encoder-decoder models also get the prompts as decoder input."""
    batch = TOKENIZER(prompts, return_tensors="pt", padding=True)
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = batch["input_ids"]
    return dict(batch)


def logits(model, prompts: list[str] = PROBES) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(model, prompts)).logits


def target_log_prob(model, prompt: str, target: str) -> float:
    """Sum of the log-probabilities of `target`'s tokens after `prompt`, computed without the library's helpers."""
    tokenizer = TOKENIZER
    if model.config.is_encoder_decoder:
        labels = tokenizer(target)["input_ids"]
        decoder = [model.config.decoder_start_token_id, *labels[:-1]]
        inputs = {"input_ids": torch.tensor([tokenizer(prompt)["input_ids"]]),
                  "decoder_input_ids": torch.tensor([decoder])}
        start = 0
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        labels = tokenizer(prompt + " " + target)["input_ids"][len(prompt_ids) :]
        inputs = {"input_ids": torch.tensor([prompt_ids + labels])}
        start = len(prompt_ids) - 1
    with torch.no_grad():
        log_probs = model(**inputs).logits[0].float().log_softmax(-1)
    return sum(log_probs[start + i, token].item() for i, token in enumerate(labels))


def state_copy(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == state.keys()
    changed = [name for name, tensor in current.items() if not torch.equal(tensor, state[name])]
    assert not changed, f"weights changed: {changed}"


def forward_hooks(model) -> dict[str, int]:
    """How many forward hooks each submodule has (only the modules that have some)."""
    return {name: len(module._forward_hooks) for name, module in model.named_modules() if module._forward_hooks}


class Snapshot:
    """Everything a failed operation must leave as it was: weights, outputs, hooks, edits and their requests."""

    def __init__(self, edited):
        self.edited = edited
        self.state = state_copy(edited.base_model)
        self.logits = logits(edited)
        self.hooks = forward_hooks(edited.base_model)
        self.hook_paths = sorted(edited._hooks)
        self.edits = {name: len(edit.requests) for name, edit in edited._edits.items()}
        self.active = edited.active_edits
        self.requires_grad = {name: p.requires_grad for name, p in edited.base_model.named_parameters()}
        self.training = edited.base_model.training

    def assert_unchanged(self) -> None:
        edited = self.edited
        assert_same_state(edited.base_model, self.state)
        assert torch.equal(logits(edited), self.logits)
        assert forward_hooks(edited.base_model) == self.hooks
        assert sorted(edited._hooks) == self.hook_paths
        assert sorted(edited._hooks) == sorted({p for e in edited._edits.values() for p in e.components})
        assert not edited._pending
        assert {name: len(edit.requests) for name, edit in edited._edits.items()} == self.edits
        assert edited.active_edits == self.active
        assert {n: p.requires_grad for n, p in edited.base_model.named_parameters()} == self.requires_grad
        assert edited.base_model.training == self.training


def curve_scores(curve: list[dict]) -> list[dict]:
    """A sequential run's checkpoints without their edit seconds, which are timed anew by every run."""
    return [{key: value for key, value in point.items() if key != "edit_seconds_per_case"} for point in curve]


class StopRun(RuntimeError):
    """Raised by `counting_editor`'s FT: an evaluation run killed part-way."""


def counting_editor(monkeypatch, stop_at_subject=None):
    """Count FT's edits; raise `StopRun` (a run killed part-way) when the edit of `stop_at_subject` comes."""
    compute = FTEditor.compute_components
    subjects = []

    def counted(self, edited_model, requests):
        subjects.extend(r.subject for r in requests)
        if stop_at_subject in [r.subject for r in requests]:
            raise StopRun("stopped")
        return compute(self, edited_model, requests)

    monkeypatch.setattr(FTEditor, "compute_components", counted)
    return subjects
