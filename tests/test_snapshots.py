"""Snapshots of sequential runs: a stopped stream resumes from its last checkpoint without recomputing its edits."""

import functools
import json

import pytest
import torch

from hf_knowedit.cli import main
from hf_knowedit.config import build_config, get_editor_class
from hf_knowedit.edited_model import EditedModel
from hf_knowedit.evaluation import EvaluationSettingsError, harness, run_evaluation
from hf_knowedit.evaluation.harness import DEFAULT_SNAPSHOT_EVERY, _snapshot_interval
from hf_knowedit.evaluation.snapshots import SNAPSHOTS_DIR, latest_snapshot, load_snapshot, save_snapshot
from hf_knowedit.methods.alphaedit.editor import AlphaEditEditor
from hf_knowedit.methods.ft.editor import FTEditor

from .helpers import BATCH, PROBES, TOKENIZER, StopRun, counting_editor, curve_scores, logits
from .test_device_map import CONFIGS
from .test_evaluation import _records, _settings, dataset  # noqa: F401  (the dataset fixture)
from .test_locate_then_edit import REQUESTS, fast_config, sharpened_model
from .tiny_models import tiny_model, tiny_tokenizer


def _run(settings, output, **kwargs):
    return run_evaluation(settings, output, model=tiny_model("llama"), tokenizer=tiny_tokenizer(), **kwargs)


def _post_scores(output):
    return {r["index"]: r["post"]["scores"] for r in _records(output)}


@pytest.mark.parametrize("schedule, snapshot_every", [("every:2", None), ("immediate", 2), ("final", 2)])
def test_stopped_stream_resumes_from_its_snapshot_as_if_it_had_not_stopped(dataset, tmp_path, monkeypatch,  # noqa: F811
                                                                           schedule, snapshot_every):
    """Stopped at its 4th edit, a stream of 5 resumes from its snapshot after 2 edits: with `immediate` the 3rd edit,
    scored already, is recomputed without being scored again; with `final` nothing was scored."""
    settings = _settings(dataset, "sequential", 1, schedule)
    complete = _run(settings, tmp_path / "complete", snapshot_every=snapshot_every)
    assert not (tmp_path / "complete" / SNAPSHOTS_DIR).exists()  # a finished stream keeps no snapshot

    output = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        edited_subjects = counting_editor(patch, stop_at_subject="Danielle Darrieux")  # the 4th edit
        with pytest.raises(StopRun):
            _run(settings, output, snapshot_every=snapshot_every)
    assert len(edited_subjects) == 4
    scored_before_stop = [r["index"] for r in _records(output)] if (output / "results.jsonl").exists() else []
    assert scored_before_stop == ([0, 1, 2] if schedule == "immediate" else [])
    assert latest_snapshot(output, 10) == 2 and sorted(p.name for p in (output / SNAPSHOTS_DIR).iterdir()) == ["at-2"]
    progress = json.loads((output / SNAPSHOTS_DIR / "at-2" / "progress.json").read_text())
    assert [c["index"] for c in progress["cases"]] == [0, 1] and progress["edit"] == "evaluation"

    with monkeypatch.context() as patch:
        edited_subjects = counting_editor(patch)
        resumed = _run(settings, output, snapshot_every=snapshot_every)
    assert edited_subjects == ["Ada Lovelace", "Danielle Darrieux", "Leonardo da Vinci"]  # not the first two again
    assert sorted(r["index"] for r in _records(output)) == [0, 1, 2, 3, 4]  # each case recorded once
    assert curve_scores(resumed["curve"]) == curve_scores(complete["curve"])
    assert _post_scores(output) == _post_scores(tmp_path / "complete")
    # the first checkpoint's seconds are those timed before the stop, kept by the snapshot
    seconds = {c["index"]: c["edit_seconds"] for c in progress["cases"]}
    assert {r["index"]: r["edit_seconds"] for r in _records(output) if r["index"] < 2} == seconds
    assert not (output / SNAPSHOTS_DIR).exists()


def test_a_final_stream_stopped_while_scoring_resumes_after_its_last_edit_and_scores_only_the_cases_left(
        dataset, tmp_path, monkeypatch):  # noqa: F811
    """A `final` stream snapshots its last edit and records its scores round by round: stopped in its second round of
    scoring, it resumes without editing again and scores the cases left, in the rounds of a run that did not stop."""
    settings = _settings(dataset, "sequential", 1, "final")
    complete = _run(settings, tmp_path / "complete", snapshot_every=2, scorer_batch_size=2)
    score_cases = harness.score_cases
    scored = []

    def stop_at_ada(scorer, cases, *args, stop=True, **kwargs):
        if kwargs.get("pre_raw") is not None:  # the scores after the edits, not the untouched model's
            if stop and "Ada Lovelace" in [c.subject for c in cases]:
                raise StopRun("stopped")
            scored.append([c.subject for c in cases])
        return score_cases(scorer, cases, *args, **kwargs)

    output = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(harness, "score_cases", stop_at_ada)
        with pytest.raises(StopRun):
            _run(settings, output, snapshot_every=2, scorer_batch_size=2)
    assert [r["index"] for r in _records(output)] == [0, 1]  # the first round, recorded
    assert sorted(p.name for p in (output / SNAPSHOTS_DIR).iterdir()) == ["at-5"]  # after the last edit

    scored.clear()
    with monkeypatch.context() as patch:
        patch.setattr(harness, "score_cases", functools.partial(stop_at_ada, stop=False))
        edited_subjects = counting_editor(patch)
        resumed = _run(settings, output, snapshot_every=2, scorer_batch_size=2)
    assert edited_subjects == []  # every edit came from the snapshot
    assert scored == [["Ada Lovelace", "Danielle Darrieux"], ["Leonardo da Vinci"]]
    assert sorted(r["index"] for r in _records(output)) == [0, 1, 2, 3, 4]  # each case recorded once
    assert _post_scores(output) == _post_scores(tmp_path / "complete")
    assert resumed["metrics"] == complete["metrics"] and resumed["complete"]
    assert not (output / SNAPSHOTS_DIR).exists()


def test_snapshots_are_written_while_edits_are_recomputed_and_a_damaged_one_is_ignored(dataset, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    """A run stopped after its checkpoint at 4 edits, with no snapshot (made before snapshots were written):
    resuming recomputes the 4 edits, writing the snapshots at 2 and 4 on the way, so a second stop loses nothing."""
    settings = _settings(dataset, "sequential", 1, "every:2")
    complete = _run(settings, tmp_path / "complete")
    output = tmp_path / "run"
    with monkeypatch.context() as patch:
        counting_editor(patch, stop_at_subject="Leonardo da Vinci")  # the 5th edit
        with pytest.raises(StopRun):
            _run(settings, output)
    (output / SNAPSHOTS_DIR / "at-4" / "edit" / "evaluation" / "edit_weights.safetensors").write_bytes(b"damaged")
    with monkeypatch.context() as patch:
        edited_subjects = counting_editor(patch, stop_at_subject="Leonardo da Vinci")
        with pytest.raises(StopRun):
            _run(settings, output)  # the damaged snapshot is ignored: all 4 edits recomputed, then the 5th stops
    assert len(edited_subjects) == 5
    assert latest_snapshot(output, 10) == 4
    with monkeypatch.context() as patch:
        edited_subjects = counting_editor(patch)
        resumed = _run(settings, output)
    assert edited_subjects == ["Leonardo da Vinci"]
    assert curve_scores(resumed["curve"]) == curve_scores(complete["curve"])
    assert _post_scores(output) == _post_scores(tmp_path / "complete")


def test_overwrite_deletes_the_snapshots_of_the_run_it_replaces(dataset, tmp_path, monkeypatch):  # noqa: F811
    """A stopped stream's snapshot holds edits made with its settings: a run with other settings that overwrites it
    edits from the untouched model, not from that snapshot."""
    output = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        counting_editor(patch, stop_at_subject="Danielle Darrieux")
        with pytest.raises(StopRun):
            _run(_settings(dataset, "sequential", 1, "final"), output, snapshot_every=2)
    assert latest_snapshot(output, 10) == 2
    other = _settings(dataset, "sequential", 1, "final")
    other.config = {**other.config, "lr": 0.1}
    with monkeypatch.context() as patch:
        edited_subjects = counting_editor(patch)
        overwritten = _run(other, output, overwrite=True, snapshot_every=2)
    assert len(edited_subjects) == 5 and overwritten["num_completed"] == 5
    _run(other, tmp_path / "fresh", snapshot_every=2)
    assert _post_scores(output) == _post_scores(tmp_path / "fresh")


def test_a_snapshot_that_does_not_match_the_run_is_not_loaded(tmp_path):
    edited = EditedModel(tiny_model("llama"), tiny_tokenizer())
    assert load_snapshot(tmp_path, 2, edited, "evaluation", FTEditor, [0, 1]) is None  # none there
    (tmp_path / SNAPSHOTS_DIR / "at-2").mkdir(parents=True)
    (tmp_path / SNAPSHOTS_DIR / "at-2" / "progress.json").write_text(json.dumps(
        {"num_edits": 2, "edit": None, "cases": [{"index": 5, "edit_seconds": 1.0, "edit_refused": None}] * 2,
         "method_state": {}}))
    assert load_snapshot(tmp_path, 2, edited, "evaluation", FTEditor, [0, 1]) is None
    assert edited.edit_names == []
    (tmp_path / SNAPSHOTS_DIR / ".at-3.tmp-x").mkdir()  # the staging folder of an interrupted write is never taken
    assert latest_snapshot(tmp_path, 10) == 2


def test_a_failed_snapshot_write_keeps_the_previous_one_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    edited = EditedModel(tiny_model("llama"), tiny_tokenizer())
    edited.add_edits(build_config("ft", {"num_steps": 1}), {"prompt": "{} is in", "subject": "Atlantis",
                                                            "target_new": "Paris"}, edit_name="evaluation")
    save_snapshot(tmp_path, edited, "evaluation", FTEditor, [0], {0: 1.0}, {0: None})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def failing(cls, edited_model, edit_name):
        raise OSError("disk full")

    monkeypatch.setattr(FTEditor, "stream_state", classmethod(failing))
    with pytest.raises(OSError, match="disk full"):
        save_snapshot(tmp_path, edited, "evaluation", FTEditor, [0, 1], {0: 1.0, 1: 1.0}, {0: None, 1: None})
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert load_snapshot(tmp_path, 1, EditedModel(tiny_model("llama"), tiny_tokenizer()), "evaluation", FTEditor,
                         [0]) == ({0: 1.0}, {0: None})


def test_snapshot_interval_defaults_and_checks(dataset, tmp_path):  # noqa: F811
    # defaults: each checkpoint of every:K, every DEFAULT_SNAPSHOT_EVERY edits otherwise, none outside sequential mode
    assert _snapshot_interval(_settings(dataset, "sequential", 1, "every:2"), None) == 2
    assert _snapshot_interval(_settings(dataset, "sequential", 1, "immediate"), None) == DEFAULT_SNAPSHOT_EVERY == 100
    assert _snapshot_interval(_settings(dataset, "sequential", 1, "final"), None) == 100
    assert _snapshot_interval(_settings(dataset, "batch", 2), None) == 0
    assert _snapshot_interval(_settings(dataset, "sequential", 1, "every:2"), 4) == 4
    # bad values are refused before the run writes anything
    for settings, value, message in [
        (_settings(dataset, "batch", 2), 2, "applies to mode 'sequential'"),
        (_settings(dataset, "sequential", 1, "every:2"), 3, "must be a multiple of 2"),
        (_settings(dataset, "sequential", 1, "immediate"), -1, "non-negative integer"),
    ]:
        with pytest.raises(EvaluationSettingsError, match=message):
            _run(settings, tmp_path / "run", snapshot_every=value)
        assert not (tmp_path / "run").exists()


def test_the_command_line_passes_snapshot_every_on(dataset, tmp_path, capsys):  # noqa: F811
    argv = ["evaluate", "--method", "ft", "--dataset", dataset, "--mode", "sequential", "--eval-schedule", "every:2",
            "--snapshot-every", "3", "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "snapshot_every must be a multiple of 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_no_snapshots_when_snapshot_every_is_0(dataset, tmp_path, monkeypatch):  # noqa: F811
    settings = _settings(dataset, "sequential", 1, "every:2")
    with monkeypatch.context() as patch:
        counting_editor(patch, stop_at_subject="Leonardo da Vinci")  # the 5th edit, after the checkpoint at 4
        with pytest.raises(StopRun):
            _run(settings, tmp_path / "run", snapshot_every=0)
    assert [json.loads(line)["num_edits"] for line in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()] \
        == [2, 4]
    assert not (tmp_path / "run" / SNAPSHOTS_DIR).exists()


@pytest.mark.usefixtures("isolated_statistics_cache")
def test_alphaedit_stream_continues_from_a_snapshot_exactly(tmp_path):
    """AlphaEdit keeps the keys of the edited requests at edit time (its `K_p`); the snapshot keeps them too, so
    edits made after a reload equal those made without one, bit for bit."""
    config = fast_config("alphaedit")
    live = EditedModel(sharpened_model("llama"), tiny_tokenizer())
    live.add_edits(config, REQUESTS[:2], edit_name="stream")
    live.add_edits(config, REQUESTS[2:3], edit_name="stream")
    save_snapshot(tmp_path, live, "stream", AlphaEditEditor, [0, 1, 2], {0: 1.0, 1: 1.0, 2: 2.0},
                  {0: None, 1: None, 2: None})
    reloaded = EditedModel(sharpened_model("llama"), tiny_tokenizer())
    seconds, refusals = load_snapshot(tmp_path, 3, reloaded, "stream", AlphaEditEditor, [0, 1, 2])
    assert seconds == {0: 1.0, 1: 1.0, 2: 2.0} and refusals == {0: None, 1: None, 2: None}
    live_state, _ = AlphaEditEditor.stream_state(live, "stream")
    reloaded_state, meta = AlphaEditEditor.stream_state(reloaded, "stream")
    assert len(meta["keys"]) == len(config.default_layers(live.layout))
    assert all(torch.equal(live_state[name], reloaded_state[name]) for name in live_state)
    for model in (live, reloaded):
        model.add_edits(config, REQUESTS[3:5], edit_name="stream")
    for path, components in live.get_edit("stream").components.items():
        again = reloaded.get_edit("stream").components[path]
        assert all(torch.equal(a.delta_weight(), b.delta_weight()) for a, b in zip(components, again, strict=True))


@pytest.mark.usefixtures("isolated_statistics_cache")
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_method_continues_a_stream_from_a_snapshot(method, tmp_path):
    """A stream of three edits ends as one snapshotted after two, loaded on a fresh model and given the third: what
    each method keeps between edits is in its edit or its `stream_state` (AlphaEdit's keys of edited requests, which
    differ from keys recomputed on the model once later edits changed the layers below them)."""
    editor_class = get_editor_class(CONFIGS[method]().edit_type)
    live = EditedModel(tiny_model("llama"), TOKENIZER)
    for number, request in enumerate(BATCH[:2]):
        torch.manual_seed(number)
        live.add_edits(CONFIGS[method](), [request], edit_name="stream")
    save_snapshot(tmp_path, live, "stream", editor_class, [0, 1], {0: 1.0, 1: 1.0}, {0: None, 1: None})
    reloaded = EditedModel(tiny_model("llama"), TOKENIZER)
    assert load_snapshot(tmp_path, 2, reloaded, "stream", editor_class, [0, 1]) == ({0: 1.0, 1: 1.0},
                                                                                  {0: None, 1: None})
    prompts = [r.filled_prompt for r in BATCH] + PROBES
    torch.testing.assert_close(logits(reloaded, prompts), logits(live, prompts), rtol=1e-4, atol=1e-5)
    for model in (live, reloaded):
        torch.manual_seed(2)
        model.add_edits(CONFIGS[method](), BATCH[2:], edit_name="stream")
    torch.testing.assert_close(logits(reloaded, prompts), logits(live, prompts), rtol=1e-4, atol=1e-5)
