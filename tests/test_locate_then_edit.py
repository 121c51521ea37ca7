"""ROME, MEMIT and AlphaEdit on tiny models of every decoder-only architecture (and their shared core).

The tiny models have random weights with standard deviation 0.02, so their logits barely move whatever the hidden
state; the tests scale the LM head by 100 ("sharpened" models) so that a target's probability can rise by orders of
magnitude. Prompts end with the subject, whose last token is where the edit acts. Statistics come from 2,048 WikiText
tokens into a temporary cache; everything else uses few steps and prefixes, so the file runs in about a minute.
"""

import json

import pytest
import torch

from hf_knowedit import EditConfig, EditedModel, EditRequest, LowRankDelta
from hf_knowedit.errors import (
    ArchitectureNotSupportedError,
    ContradictoryRequestsError,
    EditConfigError,
    EditFailedError,
    EditRequestError,
)
from hf_knowedit.locate import batch_update, null_space_update, rank_one_update
from hf_knowedit.methods.alphaedit import AlphaEditConfig
from hf_knowedit.methods.memit import MEMITConfig
from hf_knowedit.methods.rome import ROMEConfig
from hf_knowedit.tokenization import encode_prompt_target

from .helpers import ROOT, WIKITEXT
from .tiny_models import DECODER_ARCHITECTURES, tiny_model, tiny_tokenizer


CONFIGS_DIR = ROOT / "editing_configs"
pytestmark = pytest.mark.usefixtures("isolated_statistics_cache")

FAST = dict(v_num_grad_steps=15, v_lr=1.0, clamp_norm_factor=1e4, v_weight_decay=0.0, num_context_prefixes=2,
            context_prefix_length=4, mom2_num_tokens=2048, stats_corpus=str(WIKITEXT))
SUBJECTS = ["Atlantis", "Narnia", "Gondor", "Mordor", "Hogwarts", "Wakanda", "Asgard", "Latveria"]
TARGETS = ["Paris", "London", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima"]
REQUESTS = [EditRequest(prompt="The new capital is {}", subject=s, target_new=t) for s, t in zip(SUBJECTS, TARGETS)]


def fast_config(method: str, **kwargs):
    if method == "rome":
        return ROMEConfig(**{**FAST, **kwargs})
    if method == "memit":
        return MEMITConfig(**{**FAST, "mom2_update_weight": 1.0, **kwargs})
    return AlphaEditConfig(**{**FAST, "l2_regularization": 1e-4, "nullspace_threshold": 0.1,
                              "nullspace_relative": True, **kwargs})




def sharpened_model(arch: str):
    model = tiny_model(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(100)
    return model


def target_probs(model, requests) -> torch.Tensor:
    tokenizer = tiny_tokenizer()
    batch = encode_prompt_target(tokenizer, [r.filled_prompt for r in requests], [r.target_new for r in requests],
                                 model=model)
    with torch.no_grad():
        return batch.target_log_probs(model(**batch.model_inputs()).logits).exp()


def probe_logits(model) -> torch.Tensor:
    batch = tiny_tokenizer()(["A sentence about nothing in particular", "The new capital is Atlantis"],
                             return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
@pytest.mark.parametrize("arch", DECODER_ARCHITECTURES)
def test_edit_raises_target_probability(arch, method):
    edited = EditedModel(sharpened_model(arch), tiny_tokenizer())
    requests = REQUESTS[:1] if method == "rome" else REQUESTS[:3]
    before = target_probs(edited, requests)
    base_logits = probe_logits(edited)
    edited.add_edits(fast_config(method), requests)
    after = target_probs(edited, requests)
    assert (after > 10 * before).all(), (before, after)
    stats = edited.get_edit().stats
    for phase in ("statistics", "keys", "values", "solve"):
        assert stats[f"{phase}_seconds"] >= 0
    for components in edited.get_edit().components.values():
        assert all(isinstance(c, LowRankDelta) and c.rank <= len(requests) for c in components)
    with edited.disable_edits():
        assert torch.equal(probe_logits(edited), base_logits)
    assert torch.equal(probe_logits(edited.unload()), base_logits)


def test_rome_is_rank_one_and_saves_two_vectors(tmp_path):
    from safetensors.torch import load_file

    edited = EditedModel(sharpened_model("gpt2"), tiny_tokenizer())
    edited.add_edits(fast_config("rome"), REQUESTS[:1])
    [(path, [delta])] = edited.get_edit().components.items()
    assert delta.rank == 1 and torch.linalg.matrix_rank(delta.delta_weight()) == 1
    edited.save_pretrained(tmp_path)
    tensors = {}
    for file in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    assert len(tensors) == 2 and sorted(t.dim() for t in tensors.values()) == [2, 2]
    assert sorted(t.numel() for t in tensors.values()) == [32, 64]  # one vector of d_v=32, one of d_k=64
    reloaded = EditedModel.from_pretrained(tiny_model("gpt2").eval(), tmp_path, tokenizer=tiny_tokenizer())
    with torch.no_grad():
        reloaded.base_model.get_output_embeddings().weight.mul_(100)
    assert torch.allclose(probe_logits(reloaded), probe_logits(edited), atol=1e-5)


def test_rome_batch_is_sequential_rank_one_updates():
    edited = EditedModel(sharpened_model("llama"), tiny_tokenizer())
    before = target_probs(edited, REQUESTS[:3])
    edited.add_edits(fast_config("rome"), REQUESTS[:3])
    [delta] = next(iter(edited.get_edit().components.values()))
    assert delta.rank == 3
    assert (target_probs(edited, REQUESTS[:3]) > 10 * before).all()


def test_memit_batch_of_50_stays_low_rank():
    requests = [EditRequest(prompt="The new capital is {}", subject=f"{SUBJECTS[i % 8]} {i}",
                            target_new=TARGETS[(i * 3) % 8]) for i in range(50)]
    edited = EditedModel(sharpened_model("llama"), tiny_tokenizer())
    edited.add_edits(fast_config("memit", v_num_grad_steps=4, values_batch_size=25), requests)
    components = edited.get_edit().components
    assert len(components) == len(MEMITConfig().default_layers(edited.layout))
    for [delta] in components.values():
        assert delta.rank <= 50
        assert torch.linalg.matrix_rank(delta.delta_weight()) <= 50


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_alphaedit_leaves_preserved_keys_unchanged(arch):
    from hf_knowedit.locate.base import layer_statistics

    edited = EditedModel(sharpened_model(arch), tiny_tokenizer())
    config = fast_config("alphaedit")
    edited.add_edits(config, REQUESTS[:3])
    edited.add_edits(config, REQUESTS[3:5])  # sequential: the first edit's keys join the solve
    statistics = layer_statistics(edited, config.default_layers(edited.layout), config)
    for layer, stats in statistics.items():
        eigenvalues, eigenvectors = torch.linalg.eigh(stats.second_moment.double())
        preserved = eigenvectors[:, eigenvalues >= 0.1 * eigenvalues[-1]].float()  # the space P projects away
        assert preserved.shape[1] > 0
        delta = sum(c.delta_weight() for c in edited.get_edit().components[edited.layout.mlp_out_path(layer)])
        assert (delta @ preserved).norm() <= 1e-5 * delta.norm() * preserved.norm()
    assert len(edited.get_edit().requests) == 5


def test_encoder_decoder_is_refused():
    edited = EditedModel(tiny_model("t5"), tiny_tokenizer())
    for method in ("rome", "memit", "alphaedit"):
        with pytest.raises(ArchitectureNotSupportedError, match="encoder-decoder"):
            edited.add_edits(fast_config(method), REQUESTS[:1])
    assert edited.edit_names == []


def test_contradicting_requests_are_refused():
    edited = EditedModel(tiny_model("llama"), tiny_tokenizer())
    conflicting = [REQUESTS[0], EditRequest(prompt="The new capital is {}", subject="Atlantis", target_new="Oslo"),
                   REQUESTS[1], EditRequest(prompt="The new capital is {}", subject="Narnia", target_new="Oslo"),
                   EditRequest(prompt="The new capital is {}", subject="Atlantis", target_new="Paris")]  # agrees
    with pytest.raises(ContradictoryRequestsError, match=r"Requests 0 and 1 contradict .* \(and 1 more") as error:
        edited.add_edits(fast_config("memit"), conflicting)
    assert isinstance(error.value, EditRequestError) and error.value.conflicts == [(0, 1), (2, 3)]
    assert edited.edit_names == []


def test_non_finite_update_leaves_model_unchanged():
    edited = EditedModel(sharpened_model("llama"), tiny_tokenizer())
    base_logits = probe_logits(edited)
    block = edited.layout.blocks(edited.base_model)[-1]
    handle = block.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(EditFailedError):
            edited.add_edits(fast_config("rome"), REQUESTS[:1])
    finally:
        handle.remove()
    assert edited.edit_names == []
    assert torch.equal(probe_logits(edited), base_logits)


def test_solves_check_their_inputs():
    key, residual = torch.randn(8), torch.randn(4)
    with pytest.raises(EditFailedError, match="singular"):
        rank_one_update(key, residual, torch.zeros(8, 8))
    with pytest.raises(EditFailedError, match="NaN"):
        rank_one_update(key * float("nan"), residual)
    with pytest.raises(EditFailedError):
        batch_update(torch.randn(2, 8), torch.full((2, 4), float("inf")), torch.eye(8), 1.0)
    up, down = null_space_update(torch.randn(2, 8), torch.randn(2, 4), torch.eye(8), None, 1e-6)
    assert up.shape == (4, 2) and down.shape == (2, 8)


def test_default_layers_follow_depth():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_knowedit.architectures import resolve_layout

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=2)
    layout = resolve_layout(LlamaForCausalLM(config))
    assert ROMEConfig().default_layers(layout) == [5]
    assert MEMITConfig().default_layers(layout) == [4, 5, 6, 7, 8]
    assert AlphaEditConfig().default_layers(layout) == [4, 5, 6, 7, 8]
    with pytest.raises(EditConfigError):
        ROMEConfig(layers=[1, 2])


READY_CONFIGS = sorted(p for method in ("rome", "memit", "alphaedit") for p in CONFIGS_DIR.glob(f"{method}/*.json"))


@pytest.mark.parametrize("path", READY_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ready_configs_load(path):
    data = json.loads(path.read_text())
    config = EditConfig.from_dict(data)
    assert config.edit_type == path.parent.name
    assert type(config).from_dict(data).to_dict() == config.to_dict()
