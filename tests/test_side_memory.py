"""Side-memory editors (SERAC, T-Patcher, CaliNET, GRACE, IKE) on tiny models of decoder-only and T5 architectures.

On tiny random models the target criterion is the greedy first target token on a model whose output embedding is
sharpened (x100, as in the locate-then-edit tests) for decoder-only models, and a target log-probability raised by
more than one nat for T5 (whose output embedding is tied to its input one). Methods that route prompts away (GRACE,
IKE, SERAC, T-Patcher when no patch fires) must leave out-of-scope logits identical, and a batch mixing an in-scope
and an out-of-scope prompt must give the outputs of each prompt alone.
"""

import json

import pytest
import torch

from hf_knowedit import (
    ArtifactError,
    BaseModelMismatchError,
    EditConfigError,
    EditedModel,
    EditFailedError,
    EditRequest,
)
from hf_knowedit.data import load_config_records
from hf_knowedit.edited_model import SHARED_CONTEXT_MODEL_TYPES
from hf_knowedit.locate import ResumedTargetLogProbs
from hf_knowedit.methods.calinet import CaliNETConfig
from hf_knowedit.methods.calinet.side_ffn import SideFFN, ffn_host_path
from hf_knowedit.methods.ft import FTConfig
from hf_knowedit.methods.grace import GRACEConfig
from hf_knowedit.methods.ike import IKEConfig
from hf_knowedit.methods.ike.editor import load_demonstration_pool
from hf_knowedit.methods.tpatcher import TPatcherConfig
from hf_knowedit.methods.tpatcher import editor as tpatcher_editor
from hf_knowedit.methods.tpatcher.editor import (
    GENERIC_MEMORY_PROMPTS,
    TPatcherEditor,
    max_margin_direction,
    memory_file_prompts,
)
from hf_knowedit.scoring import BatchScorer
from hf_knowedit.tokenization import encode_prompt_target

from .helpers import COUNTERFACT_TRAIN, TOKENIZER, model_inputs, target_log_prob
from .tiny_models import DECODER_ARCHITECTURES, tiny_model


DATA = str(COUNTERFACT_TRAIN)
REQUEST = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
SECOND = EditRequest(prompt="{} plays the instrument", subject="Miles Davis", target_new="violin")
IN_SCOPE = REQUEST.filled_prompt
OUT_OF_SCOPE = "Nobody expected the weather to"
ARCHS = ["gpt2", "llama", "t5"]
CONFIGS = {
    "grace": lambda: GRACEConfig(num_steps=40),
    "tpatcher": lambda: TPatcherConfig(num_steps=30, lr=5e-2),
    "calinet": lambda: CaliNETConfig(num_steps=30, num_slots=16, lr=5e-2),
    "ike": lambda: IKEConfig(demonstrations_file=DATA, num_demonstrations=3, max_pool_records=50),
}
TRAINED = ["grace", "tpatcher", "calinet"]  # methods that learn the target (IKE is checked through its context)
ROUTING = ["grace", "tpatcher", "ike"]  # methods that leave out-of-scope prompts exactly as they were


def base_model(arch: str, seed: int = 0):
    model = tiny_model(arch, seed)
    if not model.config.is_encoder_decoder:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(100)
    return model


def logits(model, prompts):
    """Logits at every prompt position; for T5, at the first decoder position (where the edits' keys are read)."""
    inputs = model_inputs(model, prompts)
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.full((len(prompts), 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        return model(**inputs).logits


def edited(arch: str, method: str, requests=(REQUEST,)):
    return EditedModel(base_model(arch), TOKENIZER).add_edits(CONFIGS[method](), list(requests))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", TRAINED)
def test_edit_produces_target(arch, method):
    model = base_model(arch)
    before = target_log_prob(model, IN_SCOPE, REQUEST.target_new)
    model = EditedModel(model, TOKENIZER).add_edits(CONFIGS[method](), [REQUEST])
    after = target_log_prob(model, IN_SCOPE, REQUEST.target_new)
    if model.config.is_encoder_decoder:
        assert after > before + 1.0, (before, after)
    else:
        first = TOKENIZER(" " + REQUEST.target_new)["input_ids"][0]
        assert logits(model, [IN_SCOPE])[0, -1].argmax().item() == first


@pytest.mark.parametrize("arch", ARCHS)
def test_ike_answers_in_scope_prompts_with_its_context(arch):
    model = edited(arch, "ike")
    context = model.get_edit().components[""][0].context(0)
    assert context.endswith(f"New Fact: {IN_SCOPE} Paris\n") and context.count("New Fact:") == 4
    got = logits(model, [IN_SCOPE])
    with model.disable_edits():
        plain = logits(model, [IN_SCOPE])
        with_context = logits(model, [context + IN_SCOPE])
    assert not torch.allclose(got, plain)
    if model.config.is_encoder_decoder:  # the context goes before the prompt on the encoder side
        assert torch.allclose(got, with_context, atol=1e-5)
    else:
        assert torch.allclose(got[0], with_context[0, -got.shape[1]:], atol=1e-5)
        tokens = TOKENIZER([IN_SCOPE], return_tensors="pt")
        out = model.generate(**tokens, max_new_tokens=2, do_sample=False, pad_token_id=TOKENIZER.pad_token_id)
        width = tokens["input_ids"].shape[1]
        assert torch.equal(out[:, :width], tokens["input_ids"]) and out.shape[1] == width + 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_routed_batch_computes_logits_at_the_prompts_positions_only(arch):
    """Two in-scope prompts of different lengths, each with its own context: the output layer sees only the positions
    from the first prompt token on (not the demonstrations'), and each row's logits are those of its context and
    prompt run alone."""
    model = edited(arch, "ike", [REQUEST, SECOND])
    prompts = [IN_SCOPE, "Everyone in Atlantis knows that Miles Davis plays the instrument"]
    seen = []
    hook = model.base_model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        got = logits(model, prompts)
    finally:
        hook.remove()
    memory = model.get_edit().components[""][0]
    contexts = [memory.context(memory.match(p)) for p in prompts]
    context_tokens = [len(TOKENIZER(c)["input_ids"]) for c in contexts]
    widths = [len(TOKENIZER(c + p)["input_ids"]) for c, p in zip(contexts, prompts)]
    assert seen == [max(widths) - min(context_tokens)]
    with model.disable_edits():
        for row, (context, prompt) in enumerate(zip(contexts, prompts)):
            alone = logits(model, [context + prompt])[0]
            n = len(TOKENIZER(prompt)["input_ids"])
            torch.testing.assert_close(got[row, :n], alone[-n:], atol=1e-4 * alone.abs().max(), rtol=0)
            assert not got[row, n:].any()  # padding


SHARING = ["The capital of Atlantis is", "People in Atlantis speak", "Miles Davis plays the",
           "Nobody expected the weather to", "Atlantis is a"]  # three prompts of one context, one of another, one none
# a fact whose context is longer than REQUEST's, so that the contexts of a batch are padded
LONGER = EditRequest(prompt="{} plays the instrument", subject="Miles Davis",
                     target_new="the electric violin, the piano and the drums")


def assert_rows_as_alone(model, prompts, got):
    """Every row of `got` (logits of a routed batch) equals its context and prompt run alone; padding is zero."""
    contexts = model.routed_contexts(prompts)
    with model.disable_edits(), torch.no_grad():
        for row, (prompt, context) in enumerate(zip(prompts, contexts)):
            ids = TOKENIZER(prompt)["input_ids"]
            context_ids = TOKENIZER(context, add_special_tokens=False)["input_ids"] if context else []
            alone = model(input_ids=torch.tensor([context_ids + ids])).logits[0, -len(ids):]
            torch.testing.assert_close(got[row, : len(ids)], alone, atol=1e-5 * alone.abs().max(), rtol=0)
            assert not got[row, len(ids):].any()


def forward_shapes(model):
    """Record the `input_ids` shape of every call of `model`'s base model (a hook; remove it with `.remove()`)."""
    shapes = []
    hook = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes, hook


@pytest.mark.parametrize("arch", DECODER_ARCHITECTURES)
def test_prompts_sharing_a_context_run_it_once_with_the_logits_of_each_prompt_run_alone(arch):
    """A batch where three prompts fall under one fact, one under another and one under none: the two contexts run in
    one pass, the four routed prompts after their context's cache, the plain one alone; every row's logits are those of
    its context and prompt run on their own."""
    model = edited(arch, "ike", [REQUEST, LONGER])
    assert model.base_model.config.model_type in SHARED_CONTEXT_MODEL_TYPES
    contexts = model.routed_contexts(SHARING)
    assert contexts[0] == contexts[1] == contexts[4] != contexts[2] and contexts[3] is None
    lengths = {len(TOKENIZER(c, add_special_tokens=False)["input_ids"]) for c in contexts if c}
    assert len(lengths) == 2  # the shorter context is padded
    shapes, hook = forward_shapes(model)
    try:
        got = logits(model, SHARING)
    finally:
        hook.remove()
    assert [s[0] for s in shapes] == [2, 4, 1] and shapes[0][1] >= max(lengths)  # contexts, routed prompts, plain one
    assert_rows_as_alone(model, SHARING, got)


def test_a_sliding_window_shorter_than_the_routed_rows_runs_a_context_per_prompt():
    """Gemma 3's sliding layers with a window shorter than the contexts: the window would slide over the padding of
    the shorter context in the shared cache, so each prompt runs with its own copy of its context, in one pass."""
    model = edited("gemma3", "ike", [REQUEST, LONGER])
    model.base_model.config.sliding_window = 16
    for layer in model.base_model.model.layers:
        layer.self_attn.sliding_window = 16
    shapes, hook = forward_shapes(model)
    try:
        got = logits(model, SHARING)
    finally:
        hook.remove()
    assert [s[0] for s in shapes] == [len(SHARING)]
    assert_rows_as_alone(model, SHARING, got)


def test_the_scorer_batches_the_prompts_of_one_context_together():
    """Batches of two over prompts of alternating contexts: the scorer pairs the prompts of each context, so every
    batch runs one context; the scores are those of scoring each prompt alone."""
    model = edited("llama", "ike", [REQUEST, SECOND])
    prompts = ["Atlantis is", "Miles Davis is a", "The capital of Atlantis is", "Miles Davis plays the instrument"]
    targets = [" big", " man", " Paris", " violin"]  # by length alone, each batch would mix the two contexts
    shapes, hook = forward_shapes(model)
    try:
        together = BatchScorer(model, TOKENIZER, batch_size=2).score_targets(prompts, targets)
    finally:
        hook.remove()
    assert [s[0] for s in shapes] == [1, 2, 1, 2]  # per batch: one context, then its two prompts
    alone = BatchScorer(model, TOKENIZER, batch_size=1).score_targets(prompts, targets)
    for a, b in zip(together, alone):
        assert a.predicted_ids == b.predicted_ids and a.mean_log_prob == pytest.approx(b.mean_log_prob, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ROUTING)
def test_out_of_scope_unchanged_and_mixed_batch_routed_per_prompt(arch, method):
    model = edited(arch, method)
    with model.disable_edits():
        base_out = logits(model, [OUT_OF_SCOPE])
    assert torch.equal(logits(model, [OUT_OF_SCOPE]), base_out)
    alone = [logits(model, [IN_SCOPE]), logits(model, [OUT_OF_SCOPE])]
    mixed = logits(model, [IN_SCOPE, OUT_OF_SCOPE])
    for row, single in enumerate(alone):
        width = single.shape[1]
        assert torch.allclose(mixed[row, :width], single[0], atol=1e-4 * single.abs().max()), (method, row)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_save_reload_and_unload(arch, method, tmp_path):
    model = base_model(arch)
    original, probes = state(model), [IN_SCOPE, OUT_OF_SCOPE]
    base_out = logits(model, probes)
    edit = EditedModel(model, TOKENIZER).add_edits(CONFIGS[method](), [REQUEST])
    out = logits(edit, probes)
    assert not torch.equal(out, base_out)
    edit.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "edit_config.json").read_text())
    assert config["edit_type"] == method and config["edit_modules"]
    reloaded = EditedModel.from_pretrained(base_model(arch), tmp_path, tokenizer=TOKENIZER)
    assert torch.equal(logits(reloaded, probes), out)
    with edit.disable_edits():
        assert torch.equal(logits(edit, probes), base_out)
    base = edit.unload()
    assert torch.equal(logits(base, probes), base_out)
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    assert not base._forward_hooks and all(not m._forward_hooks for m in base.modules())


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_sequential_edits_accumulate(method):
    model = edited("gpt2", method)
    model.add_edits(CONFIGS[method](), [SECOND])
    (path, comps), = model.get_edit().components.items()
    assert len(comps) == 1 and len(model.get_edit().requests) == 2
    size = {"grace": lambda c: len(c), "tpatcher": lambda c: c.num_neurons, "calinet": lambda c: c.num_neurons,
            "ike": lambda c: len(c.entries)}[method](comps[0])
    assert size == (32 if method == "calinet" else 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_calinet_batch_in_passes_takes_the_steps_of_one_pass(arch):
    """A batch larger than `requests_per_pass` accumulates each step's gradient over passes (here of 2, 2 and 1
    requests): the slots and losses are those of one pass over all five, up to float rounding."""
    edits = {per_pass: _calinet_five_facts(arch, per_pass, stop_loss=1e-9) for per_pass in (128, 2)}
    assert edits[128].stats["calinet_passes_per_step"] == 1 and edits[2].stats["calinet_passes_per_step"] == 3
    assert edits[2].stats["calinet_steps"] == edits[128].stats["calinet_steps"] == 6
    for key in ("calinet_initial_loss", "calinet_final_loss"):
        assert edits[2].stats[key] == pytest.approx(edits[128].stats[key], rel=1e-5)
    (_, (one,)), = edits[128].components.items()
    (_, (passes,)), = edits[2].components.items()
    for a, b in zip(one.state_dict().values(), passes.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    assert not torch.equal(one.state_dict()["values"], torch.zeros_like(one.state_dict()["values"]))


def _calinet_five_facts(arch, requests_per_pass, stop_loss, num_steps=6):
    """The edit of five facts at once by CaliNET on a tiny `arch` model."""
    subjects = ["Atlantis", "Miles Davis", "Lyon", "the Moon", "Ada Lovelace"]
    targets = ["Paris", "violin", "cheese", "rock", "French"]
    requests = [EditRequest(prompt="{} is known for", subject=s, target_new=t) for s, t in zip(subjects, targets)]
    config = CaliNETConfig(num_steps=num_steps, num_slots=16, lr=5e-2, stop_loss=stop_loss,
                           requests_per_pass=requests_per_pass)
    return EditedModel(base_model(arch), TOKENIZER).add_edits(config, requests).get_edit()


@pytest.mark.parametrize("per_pass", [128, 2])
def test_calinet_stops_at_stop_loss_without_a_step_after_it(per_pass):
    """The step whose loss (over all passes) is under `stop_loss` is the last, and the slots are not moved by it: a
    loss under the bound from the start leaves the value vectors at their zero start."""
    unreached = _calinet_five_facts("gpt2", per_pass, stop_loss=1e-9, num_steps=8)
    initial, final = unreached.stats["calinet_initial_loss"], unreached.stats["calinet_final_loss"]
    assert unreached.stats["calinet_steps"] == 8 and final < initial
    halfway = _calinet_five_facts("gpt2", per_pass, stop_loss=(initial + final) / 2, num_steps=8)
    assert 1 < halfway.stats["calinet_steps"] < 8 and halfway.stats["calinet_final_loss"] < (initial + final) / 2
    at_once = _calinet_five_facts("gpt2", per_pass, stop_loss=initial + 1.0)
    assert at_once.stats["calinet_steps"] == 1
    (_, (slots,)), = at_once.components.items()
    assert torch.count_nonzero(slots.state_dict()["values"]) == 0


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_calinet_requests_per_pass_must_be_a_positive_integer(value):
    with pytest.raises(EditConfigError, match="requests_per_pass"):
        CaliNETConfig(requests_per_pass=value)


def test_grace_conflicting_edit_splits_the_ball():
    model = edited("gpt2", "grace")
    conflicting = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Rome")
    model.add_edits(CONFIGS["grace"](), [conflicting])
    book = next(iter(model.get_edit().components.values()))[0]
    assert book.labels == ["Paris", "Rome"] and torch.allclose(book.radii[0], book.radii[1])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_artifact_from_another_base_is_refused(method, tmp_path):
    edited("llama", method).save_pretrained(tmp_path)
    with pytest.raises(BaseModelMismatchError):
        EditedModel.from_pretrained(base_model("llama", seed=1), tmp_path, tokenizer=TOKENIZER)


@pytest.mark.parametrize("method", ["grace", "tpatcher"])
def test_truncated_or_misshapen_artifact_raises(method, tmp_path):
    from safetensors.torch import load_file, save_file

    edited("gpt2", method).save_pretrained(tmp_path)
    weights = tmp_path / "edit_weights.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.cat([v, v], dim=-1) if v.dim() == 2 else v for k, v in tensors.items()}, str(weights))
    with pytest.raises(ArtifactError):  # keys of another hidden size
        EditedModel.from_pretrained(base_model("gpt2"), tmp_path, tokenizer=TOKENIZER)
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ArtifactError):
        EditedModel.from_pretrained(base_model("gpt2"), tmp_path, tokenizer=TOKENIZER)


def test_truncated_memory_raises(tmp_path):
    edited("gpt2", "ike").save_pretrained(tmp_path)
    config = tmp_path / "edit_config.json"
    config.write_text(config.read_text()[:200])
    with pytest.raises(ArtifactError):
        EditedModel.from_pretrained(base_model("gpt2"), tmp_path, tokenizer=TOKENIZER)


def test_ike_demonstrations_from_any_dataset_format(tmp_path):
    """IKE's pool reads any format `load_edit_dataset` reads: copy, update and retain demonstrations per record."""
    records = [{"src": "What is the capital of Freedonia?", "subject": "Freedonia", "alt": "Fredville",
                "rephrase": "Which city is Freedonia's capital?", "loc": "nq question: who wrote hamlet",
                "loc_ans": "Shakespeare", "answers": ["Old Town"]}]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    pool = load_demonstration_pool(str(path), max_records=10)
    assert [d["text"].strip().splitlines()[-1] for d in pool] == [
        "What is the capital of Freedonia? Fredville", "Which city is Freedonia's capital? Fredville",
        "nq question: who wrote hamlet Shakespeare"]
    model = EditedModel(tiny_model("gpt2"), TOKENIZER)
    model.add_edits(IKEConfig(demonstrations_file=str(path), num_demonstrations=2), [REQUEST])
    assert model.get_edit().components
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "no edit fields"}]), encoding="utf-8")
    for wrong, match in ((bad, "cannot be read as an edit dataset"), (tmp_path / "missing.json", "does not exist")):
        with pytest.raises(EditConfigError, match=match):
            EditedModel(tiny_model("gpt2"), TOKENIZER).add_edits(IKEConfig(demonstrations_file=str(wrong)), [REQUEST])


def test_ike_reads_its_pool_once_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """A stream of IKE edits reads and indexes its demonstration file at the first edit only; a changed file is read
    again."""
    from hf_knowedit.methods.ike import editor as ike_editor

    records = [{"prompt": "The capital of {} is", "subject": name, "target_new": "Paris", "ground_truth": "Rome"}
               for name in ("Freedonia", "Sylvania")]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    reads = []
    monkeypatch.setattr(ike_editor, "load_config_records",
                        lambda *args: reads.append(args) or load_config_records(*args))
    ike_editor._indexed_pool.cache_clear()
    model = EditedModel(tiny_model("gpt2"), TOKENIZER)
    config = IKEConfig(demonstrations_file=str(path), num_demonstrations=2)
    for _ in range(3):
        model.add_edits(config, [REQUEST])
    assert len(reads) == 1
    path.write_text(json.dumps(records[:1] + [{**records[1], "subject": "Ruritania"}]), encoding="utf-8")
    fresh = EditedModel(tiny_model("gpt2"), TOKENIZER).add_edits(config, [REQUEST])
    assert len(reads) == 2 and "Ruritania" in fresh.get_edit().components[""][0].context(0)


def test_tpatcher_memory_set_from_a_dataset_file(tmp_path):
    """T-Patcher's memory set from a train split (the paper's): the records' edit and locality prompts, on which the
    patch stays silent, so their outputs are those of the base model."""
    records = [{"prompt": "The mother tongue of {} is", "subject": name, "target_new": "French",
                "ground_truth": "English", "rephrase_prompt": f"{name} speaks",
                "locality_prompt": f"{name} was born in", "locality_ground_truth": "Paris"}
               for name in ("Anna Smith", "Bo Chen", "Carl Ode")]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    assert memory_file_prompts(str(path), 2) == ("The mother tongue of Anna Smith is", "Anna Smith was born in",
                                                  "The mother tongue of Bo Chen is", "Bo Chen was born in")
    base = base_model("llama")
    memory = list(memory_file_prompts(str(path), 3))
    before = logits(base, memory)
    config = TPatcherConfig(num_steps=30, lr=5e-2, memory_file=str(path), memory_records=3)
    model = EditedModel(base, TOKENIZER).add_edits(config, [REQUEST])
    assert model.get_edit().stats["tpatcher_memory_fire_rate"] == 0.0
    torch.testing.assert_close(logits(model, memory), before, rtol=0, atol=0)
    path.write_text(json.dumps(records[2:]), encoding="utf-8")  # a file rewritten in the same process is read again
    assert memory_file_prompts(str(path), 2) == ("The mother tongue of Carl Ode is", "Carl Ode was born in")
    for wrong, match in ((tmp_path / "missing.json", "does not exist"),):
        with pytest.raises(EditConfigError, match=match):
            EditedModel(base_model("llama"), TOKENIZER).add_edits(TPatcherConfig(memory_file=str(wrong)), [REQUEST])
    with pytest.raises(EditConfigError, match="memory_records"):
        TPatcherConfig(memory_records=0)


def test_tpatcher_batch_keeps_each_patch_silent_on_the_other_requests():
    """In a batch, every other request's prompt is memory for a request's patch; their FFN inputs are computed once,
    in chunks, and split per prompt as if each prompt had been run alone."""
    requests = [REQUEST, EditRequest(prompt="The mother tongue of {} is", subject="Bo Chen", target_new="French"),
                EditRequest(prompt="{} plays the", subject="Carl Ode", target_new="violin")]
    config = TPatcherConfig(num_steps=30, lr=5e-2)
    edited = EditedModel(base_model("llama"), TOKENIZER)
    path = ffn_host_path(edited.layout, config.resolve_layers(edited.layout)[0])
    prompts = [r.filled_prompt for r in requests]
    split = TPatcherEditor.ffn_inputs(edited, path, prompts, "cpu", per_prompt=True, chunk=2)
    for prompt, inputs in zip(prompts, split):
        torch.testing.assert_close(inputs, TPatcherEditor.ffn_inputs(edited, path, [prompt], "cpu"))
    assert TPatcherEditor.ffn_inputs(edited, path, [], "cpu").shape == (0, edited.base_model.config.hidden_size)
    assert TPatcherEditor.ffn_inputs(edited, path, [], "cpu", per_prompt=True) == []
    edited.add_edits(config, requests)
    assert edited.get_edit().stats["tpatcher_memory_fire_rate"] == 0.0
    assert edited.get_edit().stats["tpatcher_neurons"] == 3 * config.neurons_per_edit
    assert 1.0 <= edited.get_edit().stats["tpatcher_value_scale"] < float("inf")


def test_tpatcher_memory_hinge_over_the_closest_memory_inputs():
    """`memory_top_k` averages the memory hinge over each patch's highest-scoring memory inputs only; `None` (and a
    `memory_top_k` above the memory's size) over all of them."""
    scores = torch.tensor([[0.5, -1.0], [-0.05, 0.2], [-2.0, -0.3], [-1.0, -0.5]])
    hinge = torch.relu(scores + 0.1)
    for top_k, expected in ((None, hinge.mean()), (9, hinge.mean()), (2, (0.6 + 0.05 + 0.3 + 0.0) / 4),
                            (1, (0.6 + 0.3) / 2)):
        editor = TPatcherEditor(TPatcherConfig(margin=0.1, memory_top_k=top_k))
        torch.testing.assert_close(editor.memory_loss(scores), torch.as_tensor(expected, dtype=torch.float32))
    for wrong in (0, -1, 1.5, True):
        with pytest.raises(EditConfigError, match="memory_top_k"):
            TPatcherConfig(memory_top_k=wrong)


def test_tpatcher_value_scale_cap():
    """Silencing a patch on a memory input that scores close to the edit input scales its value up (its output on
    the edit input is kept); `max_scale` bounds that factor, the patch then firing weakly on that memory input."""
    edit_input = torch.tensor([1.0, 0.0])
    memory = torch.tensor([[0.9, 0.0], [-1.0, 0.0]])
    patch = SideFFN(torch.tensor([[1.0, 0.0]]), torch.tensor([-0.5]), torch.tensor([[0.0, 2.0]]), "relu")
    for cap, expected_scale, fires in ((None, 0.5 / 0.05, False), (4.0, 4.0, True), (20.0, 0.5 / 0.05, False)):
        silenced, scale = TPatcherEditor.silence_on_memory(patch, edit_input, memory, cap)
        assert scale == pytest.approx(expected_scale)
        torch.testing.assert_close(silenced(edit_input, torch.zeros(2)), patch(edit_input, torch.zeros(2)))
        assert bool((silenced.scores(memory[0]) > 0).any()) == fires
        assert not (silenced.scores(memory[1]) > 0).any()
    config = TPatcherConfig(num_steps=30, lr=5e-2, memory_top_k=4, max_value_scale=2.0)
    model = EditedModel(base_model("llama"), TOKENIZER).add_edits(config, [REQUEST])
    assert 1.0 <= model.get_edit().stats["tpatcher_value_scale"] <= 2.0 + 1e-5
    for wrong in (0.5, float("inf"), "2", True):
        with pytest.raises(EditConfigError, match="max_value_scale"):
            TPatcherConfig(max_value_scale=wrong)


def test_tpatcher_max_margin_key_separates_inputs_sharing_a_common_component():
    """FFN inputs that share a large common direction: the edit input's own direction scores a memory input above the
    edit input itself, the max-margin direction scores every memory input below it, with a gap near the best one."""
    generator = torch.Generator().manual_seed(0)
    common = torch.zeros(16)
    common[0] = 10.0
    edit_input = common + torch.randn(16, generator=generator)
    memory = 1.2 * common + 0.8 * torch.randn(200, 16, generator=generator)
    assert (memory @ edit_input).max() > edit_input @ edit_input  # the paper's key cannot separate them
    direction = max_margin_direction(edit_input, memory)
    assert direction.norm() == pytest.approx(1.0)
    gap = direction @ edit_input - (memory @ direction).max()
    assert gap > 0
    # close to the best gap: a search ten times longer gains less than half as much again
    assert ((edit_input - memory) @ max_margin_direction(edit_input, memory, steps=3000)).min() < 1.5 * gap


def test_tpatcher_fixed_max_margin_key_and_the_refusal_of_a_patch_that_fires_on_its_memory(monkeypatch):
    """`key_init="max_margin"` with `train_key=False`: the patch keeps the max-margin direction, at the score
    `key_scale` on the edit input, and still writes the target. A patch that fires on more than
    `max_memory_fire_rate` of its memory inputs is refused with the model left as it was: with its own prompt as
    memory the edit input is in the memory set, and any firing patch fires on it."""
    found = []
    monkeypatch.setattr(tpatcher_editor, "max_margin_direction",
                        lambda *args: found.append((max_margin_direction(*args), args[0])) or found[-1][0])
    config = TPatcherConfig(num_steps=30, lr=5e-2, key_init="max_margin", train_key=False, key_scale=40.0)
    model = EditedModel(base_model("llama"), TOKENIZER).add_edits(config, [REQUEST])
    patch = model.get_edit().components[ffn_host_path(model.layout, config.resolve_layers(model.layout)[0])][0]
    torch.testing.assert_close(patch.keys[0] / patch.keys[0].norm(), found[0][0])
    assert float(patch.keys[0] @ found[0][1]) == pytest.approx(40.0, rel=1e-4)  # the edit input's score: untrained
    first = TOKENIZER(" " + REQUEST.target_new)["input_ids"][0]
    assert logits(model, [IN_SCOPE])[0, -1].argmax().item() == first
    assert model.get_edit().stats["tpatcher_memory_fire_rate"] == 0.0

    base = base_model("llama")
    before, weights = logits(base, [IN_SCOPE, OUT_OF_SCOPE]), state(base)
    model = EditedModel(base, TOKENIZER)
    refused = TPatcherConfig(num_steps=30, lr=5e-2, memory_prompts=[IN_SCOPE], max_memory_fire_rate=0.0)
    with pytest.raises(EditFailedError, match="fires on .* memory inputs.*max_memory_fire_rate=0.0"):
        model.add_edits(refused, [REQUEST])
    assert model.edit_names == []
    torch.testing.assert_close(logits(model, [IN_SCOPE, OUT_OF_SCOPE]), before, rtol=0, atol=0)
    assert all(torch.equal(value, weights[name]) for name, value in base.state_dict().items())
    accepted = model.add_edits(TPatcherConfig(num_steps=30, lr=5e-2, memory_prompts=[IN_SCOPE],
                                              max_memory_fire_rate=1.0), [REQUEST])
    assert 0.0 < accepted.get_edit().stats["tpatcher_memory_fire_rate"] <= 1.0
    for field, wrong in (("key_init", "random"), ("train_key", "no"), ("key_scale", 0), ("key_scale", float("nan")),
                         ("max_memory_fire_rate", 1.5),
                         ("max_memory_fire_rate", -0.1), ("max_memory_fire_rate", True)):
        with pytest.raises(EditConfigError, match=field):
            TPatcherConfig(**{field: wrong})


def test_tpatcher_reuses_its_memory_inputs_while_the_model_upstream_is_unchanged(monkeypatch):
    """Sequential T-Patcher edits stack patches at one FFN, which do not change its inputs: the memory prompts are run
    through the model once. A change upstream (a weight written in place, another method's edit, the model disabled)
    runs them again, and the reused inputs are those a fresh pass gives."""
    config = TPatcherConfig(num_steps=5, lr=5e-2)
    model = EditedModel(base_model("llama"), TOKENIZER)
    path = ffn_host_path(model.layout, config.resolve_layers(model.layout)[0])
    passes, generic = [], list(GENERIC_MEMORY_PROMPTS)
    original = TPatcherEditor.ffn_inputs

    def counting(edited_model, host, prompts, device, **kwargs):
        passes.append(list(prompts) == generic)
        return original(edited_model, host, prompts, device, **kwargs)

    monkeypatch.setattr(TPatcherEditor, "ffn_inputs", staticmethod(counting))

    def memory_passes(action):
        passes.clear()
        action()
        return sum(passes)

    assert memory_passes(lambda: model.add_edits(config, [REQUEST])) == 1
    assert memory_passes(lambda: model.add_edits(config, [SECOND])) == 0
    cached = TPatcherEditor.fixed_memory_inputs(model, path, generic, "cpu")
    torch.testing.assert_close(cached, original(model, path, generic, "cpu"), rtol=0, atol=0)
    with torch.no_grad():
        model.base_model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert memory_passes(lambda: model.add_edits(config, [REQUEST])) == 1
    model.add_edits(FTConfig(num_steps=2, layers=[0]), [SECOND], edit_name="ft")
    assert memory_passes(lambda: model.add_edits(config, [SECOND])) == 1
    assert memory_passes(lambda: model.add_edits(config, [REQUEST])) == 0
    with model.disable_edits():
        assert memory_passes(lambda: TPatcherEditor.fixed_memory_inputs(model, path, generic, "cpu")) == 1
    assert memory_passes(lambda: TPatcherEditor.fixed_memory_inputs(model, path, generic, "cpu")) == 1


def test_computation_state_never_matches_with_an_untracked_inference_tensor():
    """Equal keys on a model left as it was; a model holding an inference tensor (no version counter to read) gives
    a new key every time, so nothing computed from it is reused."""
    model = EditedModel(base_model("llama"), TOKENIZER)
    assert model.computation_state()[0] == model.computation_state()[0]
    with torch.inference_mode():
        untracked = torch.ones(3)
    model.base_model.register_buffer("untracked", untracked)
    assert model.computation_state()[0] != model.computation_state()[0]


@pytest.mark.parametrize("arch", DECODER_ARCHITECTURES)
def test_resumed_target_log_probs_equal_the_full_pass_with_gradients(arch):
    """T-Patcher and GRACE train against the target's log-probability recomputed from their block on only."""
    model = base_model(arch)
    edited = EditedModel(model, TOKENIZER)
    batch = encode_prompt_target(TOKENIZER, [IN_SCOPE, "The sky is"], [REQUEST.target_new, " blue today"],
                                 model=model)
    layer = edited.layout.num_layers - 2
    weight = edited.base_model.get_submodule(edited.layout.mlp_out_path(layer)).weight
    resumed = ResumedTargetLogProbs(edited, batch, layer)
    assert resumed.forward is not None, f"{arch} was not resumed"
    values = {}
    for name, compute in {"resumed": resumed, "full": lambda: batch.target_log_probs(model(**batch.model_inputs())
                                                                                      .logits)}.items():
        weight.grad = None
        with torch.enable_grad():
            result = compute()
            result.sum().backward()
        values[name] = result.detach(), weight.grad.clone()
    torch.testing.assert_close(values["resumed"][0], values["full"][0], rtol=1e-4, atol=1e-5)
    # within 1e-4 of the largest gradient: float32 rounding differs between CPUs (gpt_neox on an AMD EPYC: one element
    # of 2048 off by 2.0e-6, the largest gradients of the architectures being 0.006 to 35)
    scale = float(values["full"][1].abs().max())
    torch.testing.assert_close(values["resumed"][1], values["full"][1], rtol=1e-3, atol=1e-4 * scale)
    weight.grad = None
