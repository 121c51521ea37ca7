"""Resumable edits (`hf_knowedit.resumable`): an edit stopped part-way goes on from the per-request work it finished
and gives the edit of an uninterrupted call; work is reused only for the same model state, config and requests; the
harness keeps a batch's work until its scores are recorded."""

import dataclasses
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_knowedit import EditedModel, EditRequest
from hf_knowedit.evaluation import EvaluationSettings, run_evaluation
from hf_knowedit.evaluation import harness as harness_module
from hf_knowedit.locate import values as values_module
from hf_knowedit.methods.kn import KNConfig
from hf_knowedit.methods.kn import editor as kn_editor
from hf_knowedit.methods.memit import MEMITConfig
from hf_knowedit.resumable import active_edit_work, resumable_edits

from .helpers import TOKENIZER
from .test_locate_then_edit import FAST, REQUESTS
from .tiny_models import tiny_model


pytestmark = pytest.mark.usefixtures("isolated_statistics_cache")
MEMIT = MEMITConfig(**{**FAST, "v_num_grad_steps": 4, "mom2_update_weight": 1.0, "values_batch_size": 1})
KN_REQUESTS = [EditRequest(prompt="The capital of {} is", subject=s, target_new=t, target_true="Paris",
                           rephrase_prompts=[f"{s}'s capital city is"]) for s, t in [("France", "Rome"),
                                                                                       ("Spain", "Oslo"),
                                                                                       ("Peru", "Lima")]]
KN = KNConfig(steps=4)


def components(edited):
    """Every tensor of the edit's components, by module path and tensor name."""
    return {f"{path}.{name}": tensor for path, comps in edited.get_edit().components.items()
            for number, component in enumerate(comps) for name, tensor in component.state_dict().items()}


def assert_same_edit(a, b):
    """The edits of models (or component dicts) `a` and `b` hold the same tensors, bit for bit."""
    left, right = (x if isinstance(x, dict) else components(x) for x in (a, b))
    assert left and left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def run_records(output) -> list[dict]:
    """The per-case records of the evaluation run in `output`."""
    return [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]


def stop_after(monkeypatch, module, name, calls: int):
    """Make `module.name` raise on its call number `calls + 1` (an edit killed part-way)."""
    original, count = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt("stopped")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("method", ["memit", "kn"])
def test_a_stopped_edit_resumes_from_its_finished_work_to_the_uninterrupted_edit(method, tmp_path, monkeypatch):
    config, requests = (MEMIT, REQUESTS[:3]) if method == "memit" else (KN, KN_REQUESTS)
    module, name = (values_module, "_optimize_chunk") if method == "memit" else (kn_editor, "select_neurons")
    whole = EditedModel(tiny_model("llama"), TOKENIZER).add_edits(config, requests)

    model = EditedModel(tiny_model("llama"), TOKENIZER)
    original = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    with monkeypatch.context() as patch:
        stop_after(patch, module, name, 2)
        with resumable_edits(tmp_path / "work") as work, pytest.raises(KeyboardInterrupt):
            model.add_edits(config, requests)
    assert work.computed == 2 and not model.edit_names  # two of three requests done, nothing applied
    assert all(torch.equal(v, original[k]) for k, v in model.base_model.state_dict().items())
    assert len(list((tmp_path / "work").glob("*.safetensors"))) == 2

    with resumable_edits(tmp_path / "work") as work:
        model.add_edits(config, requests)
    assert (work.reused, work.computed) == (2, 1) and work.reused_seconds > 0
    assert_same_edit(model, whole)
    assert active_edit_work() is None  # only inside the block


def test_work_is_reused_only_for_the_same_model_state_config_and_requests(tmp_path):
    def run(model, config=MEMIT, requests=REQUESTS[:2]):
        with resumable_edits(tmp_path) as work:
            model.add_edits(config, requests)
        model.delete_edit(model.edit_names[-1])
        return work.reused, work.computed

    model = EditedModel(tiny_model("llama"), TOKENIZER)
    assert run(model) == (0, 2)
    assert run(model) == (2, 0)
    assert run(model, requests=[REQUESTS[0], REQUESTS[2]]) == (1, 1)  # one request in common
    assert run(model, config=dataclasses.replace(MEMIT, v_lr=0.5)) == (0, 2)
    assert run(EditedModel(tiny_model("llama", 1), TOKENIZER)) == (0, 2)  # other weights
    with torch.no_grad():  # a weight changed in place
        model.base_model.get_output_embeddings().weight[0, 0] += 1
    assert run(model) == (0, 2)
    model.add_edits(KN, KN_REQUESTS[:1], edit_name="earlier")  # an edit already on the model
    assert run(model) == (0, 2)


def test_state_digest_follows_the_forward_pass(tmp_path):
    a, b = EditedModel(tiny_model("gpt2"), TOKENIZER), EditedModel(tiny_model("gpt2"), TOKENIZER)
    assert a.state_digest() == b.state_digest()
    a.add_edits(KN, KN_REQUESTS[:1])
    edited = a.state_digest()
    assert edited != b.state_digest()
    with a.disable_edits():
        assert a.state_digest() != edited
    a.save_pretrained(tmp_path / "edit")
    reloaded = EditedModel.from_pretrained(tiny_model("gpt2"), tmp_path / "edit", tokenizer=TOKENIZER)
    assert reloaded.state_digest() == edited  # by content: another process, the same state


def test_a_damaged_piece_is_computed_again(tmp_path, caplog):
    model = EditedModel(tiny_model("llama"), TOKENIZER)
    with resumable_edits(tmp_path):
        model.add_edits(MEMIT, REQUESTS[:1])
    whole = components(model)
    model.delete_edit(model.edit_names[0])
    (piece,) = tmp_path.glob("*.safetensors")
    piece.write_bytes(piece.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, logger="hf_knowedit"), resumable_edits(tmp_path) as work:
        model.add_edits(MEMIT, REQUESTS[:1])
    assert (work.reused, work.computed) == (0, 1) and "unreadable piece" in caplog.text
    assert_same_edit(model, whole)


def test_the_harness_resumes_a_batch_stopped_in_its_edit_and_drops_its_work_once_recorded(tmp_path, monkeypatch):
    dataset = tmp_path / "facts.json"
    dataset.write_text(json.dumps([{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new}
                                   for r in REQUESTS[:4]]))
    settings = EvaluationSettings(method="memit", config=MEMIT.to_dict(), model="tiny-llama", dataset=str(dataset),
                                  n=4, mode="batch", batch_size=2, fluency_tokens=0, protocols=["token_accuracy"])

    def run(output):
        return run_evaluation(settings, output, model=tiny_model("llama"), tokenizer=TOKENIZER)

    run(tmp_path / "whole")
    with monkeypatch.context() as patch:
        stop_after(patch, values_module, "_optimize_chunk", 3)  # batch 0 done, batch 1 stopped after one request
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / "edit_work").iterdir()] == ["chunk-1"]  # chunk 0 recorded: dropped
    (piece,) = (tmp_path / "run" / "edit_work" / "chunk-1").glob("*.safetensors")
    # the piece says it took 1,000 s: the resumed batch's edit seconds must count them
    with safe_open(str(piece), framework="pt") as stored:
        tensors, metadata = {n: stored.get_tensor(n) for n in stored.keys()}, stored.metadata()
    save_file(tensors, str(piece), metadata={**metadata, "seconds": "1000.0"})
    summary = run(tmp_path / "run")
    assert summary["complete"] and not (tmp_path / "run" / "edit_work").exists()  # every chunk recorded: all dropped
    records, whole = run_records(tmp_path / "run"), run_records(tmp_path / "whole")
    assert [r["post"]["scores"] for r in records] == [r["post"]["scores"] for r in whole]
    assert records[2]["edit_seconds"] * 2 >= 1000 > records[0]["edit_seconds"] * 2  # chunk 1 reused the piece

    # a run started afresh (--overwrite) drops the work of the run it replaces
    stale = tmp_path / "run" / "edit_work" / "chunk-7"  # a chunk this run does not have
    stale.mkdir(parents=True)
    (stale / "target_values-0.safetensors").write_bytes(b"")
    run_evaluation(settings, tmp_path / "run", model=tiny_model("llama"), tokenizer=TOKENIZER, overwrite=True)
    assert not stale.exists()


def test_a_batch_stopped_in_its_scoring_scores_only_the_parts_it_had_not_scored(tmp_path, monkeypatch):
    dataset = tmp_path / "facts.json"
    dataset.write_text(json.dumps([{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                                    "rephrase_prompts": [f"Surely {r.filled_prompt}"]} for r in REQUESTS[:4]]))
    settings = EvaluationSettings(method="memit", config=MEMIT.to_dict(), model="tiny-llama", dataset=str(dataset),
                                  n=4, mode="batch", batch_size=4, fluency_tokens=0, protocols=["token_accuracy"])

    def run(output):
        return run_evaluation(settings, output, model=tiny_model("llama"), tokenizer=TOKENIZER, scorer_batch_size=2)

    run(tmp_path / "whole")
    scored = []
    original = harness_module.score_cases

    def counted(scorer, requests, *args, **kwargs):
        scored.append(len(requests))
        if len(scored) == 4:  # the pre-edit scores (2 parts), the first part after the edit, then stop
            raise KeyboardInterrupt("stopped")
        return original(scorer, requests, *args, **kwargs)

    monkeypatch.setattr(harness_module, "score_cases", counted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run")
    work = tmp_path / "run" / "edit_work" / "chunk-0"
    assert [r["index"] for r in map(json.loads, (work / "scores.jsonl").read_text().splitlines())] == [0, 1]
    scored.clear()
    stop_after(monkeypatch, values_module, "_optimize_chunk", 0)  # the target values must be read back
    summary = run(tmp_path / "run")
    assert scored == [2] and summary["complete"] and not work.exists()  # only the part left was scored
    records, whole = run_records(tmp_path / "run"), run_records(tmp_path / "whole")
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["post"]["scores"] for r in records] == [r["post"]["scores"] for r in whole]
    assert len({r["edit_seconds"] for r in records}) == 1  # one edit, one time


def test_a_case_that_contradicts_an_earlier_one_of_its_batch_is_refused_alone(tmp_path):
    """MEMIT cannot give one prompt two targets in one call: the harness edits the batch without the later case,
    records that case as refused (scored without its edit), and edits the others."""
    facts = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new} for r in REQUESTS[:3]]
    facts.append({**facts[0], "target_new": "Oslo"})
    dataset = tmp_path / "facts.json"
    dataset.write_text(json.dumps(facts))
    settings = EvaluationSettings(method="memit", config=MEMIT.to_dict(), model="tiny-llama", dataset=str(dataset),
                                  n=4, mode="batch", batch_size=4, fluency_tokens=0, protocols=["token_accuracy"])
    summary = run_evaluation(settings, tmp_path / "run", model=tiny_model("llama"), tokenizer=TOKENIZER)
    records = run_records(tmp_path / "run")
    assert [r["edit_refused"] is None for r in records] == [True, True, True, False]
    assert records[3]["edit_refused"].startswith("contradicts case 0 of its chunk")
    assert records[3]["post"]["scores"] == records[3]["pre"]["scores"]  # scored without its edit
    assert records[0]["post"]["scores"] != records[0]["pre"]["scores"]
    assert summary["edits_refused"] == 1 and summary["complete"]
