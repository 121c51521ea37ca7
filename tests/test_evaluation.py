"""End-to-end tests of the evaluation harness, the batched scorer and the reports, on a tiny model."""

import argparse
import hashlib
import importlib.util
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from hf_knowedit.config import build_config
from hf_knowedit.data import DatasetFormatError, DatasetSelectionError, load_edit_dataset
from hf_knowedit.edited_model import EditedModel
from hf_knowedit.errors import ContradictoryRequestsError, EditConfigError
from hf_knowedit.evaluation import (
    EvaluationSettings,
    EvaluationSettingsError,
    mean_ci,
    refresh_intervals,
    run_evaluation,
)
from hf_knowedit.evaluation.cli import add_evaluate_parser, add_report_parser
from hf_knowedit.evaluation.harness import (
    NORMAL_CLIPPED,
    _differences,
    contradicting_cases,
    default_label,
    editor_requests,
)
from hf_knowedit.evaluation.probes import ChatTemplateError, apply_chat_template, chat_prompt
from hf_knowedit.evaluation.report import (
    _cell,
    _distinct_names,
    _series_key,
    config_variant_names,
    efficiency_names,
    find_summaries,
    markdown_tables,
    plot_efficiency,
    plot_metrics_vs_edits,
    series_style,
    write_report,
)
from hf_knowedit.locate.base import check_consistent_requests
from hf_knowedit.scoring import BatchScorer
from hf_knowedit.utils import parse_overrides

from .helpers import curve_scores, save_tiny_model
from .tiny_models import tiny_model, tiny_tokenizer


CASES = [
    {"prompt": "The capital of {} is", "subject": "Atlantis", "target_new": "Paris", "target_true": "Rome",
     "rephrase_prompts": ["Atlantis has its capital in"],
     "locality": [{"prompt": "The capital of Spain is", "answer": "Madrid"}],
     "portability": [{"prompt": "The capital of Atlantis is on the river", "answer": ["Seine", "the Seine"]}]},
    {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": "violin", "target_true": "trumpet",
     "rephrase_prompts": ["The instrument of Miles Davis is the"],
     "locality": [{"prompt": "Eric Clapton plays the", "answer": "guitar"}]},
    {"prompt": "{} was born in", "subject": "Ada Lovelace", "target_new": "Berlin",
     "locality": [{"prompt": "Alan Turing was born in", "answer": "London"}]},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French", "rephrase_prompts": ["Danielle Darrieux speaks"],
     "locality": [{"prompt": "Michel Rocard is a native speaker of", "answer": "French"}]},
    {"prompt": "{} is a citizen of", "subject": "Leonardo da Vinci", "target_new": "Japan", "target_true": "Italy",
     "rephrase_prompts": ["The country of Leonardo da Vinci is"],
     "portability": [{"prompt": "The currency of the country of Leonardo da Vinci is the", "answer": "yen"}]},
]
CONFIG = {"num_steps": 4, "lr": 0.05}
MODES = [("single", 1, "final"), ("batch", 2, "final"), ("sequential", 2, "immediate"), ("sequential", 1, "every:2")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cases.jsonl"
    path.write_text("".join(json.dumps(case) + "\n" for case in CASES))
    return str(path)


def _settings(dataset, mode="single", batch_size=1, schedule="final", n=5, **kwargs):
    return EvaluationSettings(method="ft", config=dict(CONFIG), model="tiny-llama", dataset=dataset, n=n, mode=mode,
                              batch_size=batch_size, eval_schedule=schedule, fluency_tokens=6, **kwargs)


def _run(settings, output, **kwargs):
    return run_evaluation(settings, output, model=tiny_model("llama"), tokenizer=tiny_tokenizer(), **kwargs)


def _records(output):
    return [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    result = {}
    for mode, batch_size, schedule in MODES:
        output = root / f"{mode}_{batch_size}_{schedule.replace(':', '')}"
        result[(mode, batch_size, schedule)] = (output, _run(_settings(dataset, mode, batch_size, schedule), output))
    return root, result


@pytest.mark.parametrize("key", MODES, ids=[f"{m}-{b}-{s}" for m, b, s in MODES])
def test_each_mode_writes_records_and_summary(runs, key):
    _, by_key = runs
    output, summary = by_key[key]
    records = _records(output)
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3, 4]
    for record in records:
        assert record["mode"] == key[0]
        assert record["edit_seconds"] > 0 and record["memory"]["rss_peak_bytes"] > 0
        assert record["post"]["scores"]["reliability"]["token_accuracy"]["protocol"] == "token_accuracy"
        assert "locality_unchanged" not in record["pre"]["scores"]
        # the generations behind fluency are kept, before and after the edit
        assert all(isinstance(record[k]["fluency_text"], str) and record[k]["fluency_text"] for k in ("pre", "post"))
    assert summary["complete"] and summary["num_completed"] == 5
    assert summary["eval_schedule"] == key[2] and summary["protocols"] == ["token_accuracy", "prob_comparison",
                                                                          "exact_match"]
    assert summary["method_config"]["num_steps"] == 4 and summary["environment"]["hf_knowedit"]
    post = summary["metrics"]["post"]
    rel = post["reliability"]["token_accuracy"]
    assert rel["n"] == 5 and rel["protocol"] == "token_accuracy" and rel["ci95"][0] <= rel["mean"] <= rel["ci95"][1]
    # skips are counted, never scored zero: case 2 has no rephrase, no target_true; 2 cases lack locality or portability
    assert post["generalization"]["token_accuracy"]["skipped"] == 1
    assert post["reliability"]["prob_comparison"] == {**post["reliability"]["prob_comparison"], "n": 4, "skipped": 1}
    assert post["portability"]["token_accuracy"]["n"] == 2 and post["portability"]["token_accuracy"]["skipped"] == 3
    assert post["portability"]["prob_comparison"]["n"] == 0
    assert post["locality_unchanged"]["exact_match"]["n"] == 4
    assert summary["skip_reasons"]["portability/prob_comparison"] == {
        "portability probes have no contrasting answer": 2, "no portability prompts": 3}
    assert post["fluency"]["ngram_entropy"]["n"] == 5
    # the edits took: FT with a large learning rate raises the target's probability on the edit prompt
    before = summary["metrics"]["pre"]["reliability"]["prob_comparison"]["mean"]
    assert post["reliability"]["prob_comparison"]["mean"] >= before
    assert json.loads((output / "settings.json").read_text())["mode"] == key[0]


def test_single_and_batch_restore_the_base_model(runs):
    _, by_key = runs
    for key in (("single", 1, "final"), ("batch", 2, "final")):
        output, summary = by_key[key]
        assert summary["base_restored_checks"] == 5
        assert [r["chunk_indices"] for r in _records(output)][:2] == ([[0], [1]] if key[0] == "single"
                                                                      else [[0, 1], [0, 1]])
        # what FT reported for each chunk's edit: one call, its steps (at most the 4 of CONFIG) and losses
        for record in _records(output):
            stats = record["edit_stats"]
            assert stats["num_edit_calls"] == 1 and 1 <= stats["ft_steps"] <= 4 and stats["edit_seconds"] > 0
            assert {"ft_initial_loss", "ft_final_loss"} <= set(stats)
    assert all("edit_stats" not in r for r in _records(by_key[("sequential", 2, "immediate")][0]))


def test_sequential_schedules(runs):
    _, by_key = runs
    immediate = _records(by_key[("sequential", 2, "immediate")][0])
    assert [r["num_edits_applied"] for r in sorted(immediate, key=lambda r: r["index"])] == [2, 2, 4, 4, 5]
    output, summary = by_key[("sequential", 1, "every:2")]
    assert [p["num_edits"] for p in summary["curve"]] == [2, 4, 5]
    assert summary["curve"][0]["metrics"]["reliability"]["token_accuracy"]["n"] == 2
    assert all(r["num_edits_applied"] == 5 for r in _records(output))


def test_resume_extends_and_recovers_without_redoing_cases(dataset, tmp_path):
    output = tmp_path / "run"
    _run(_settings(dataset, n=3), output)
    first = {r["index"]: r for r in _records(output)}
    summary = _run(_settings(dataset, n=5), output)  # n may grow in single mode: cases 0-2 are kept as they were
    records = {r["index"]: r for r in _records(output)}
    assert sorted(records) == [0, 1, 2, 3, 4] and summary["num_completed"] == 5
    assert all(records[i] == first[i] for i in range(3))
    # an interruption: the last record lost and the line before cut in half
    lines = (output / "results.jsonl").read_text().splitlines()
    (output / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    summary = _run(_settings(dataset, n=5), output)
    records = {r["index"]: r for r in _records(output)}
    assert sorted(records) == [0, 1, 2, 3, 4] and summary["complete"]
    assert all(records[i] == first[i] for i in range(3))


def test_a_smaller_n_describes_the_first_cases_and_says_so(dataset, tmp_path, caplog):
    output = tmp_path / "run"
    whole = _run(_settings(dataset, n=4), output)
    with caplog.at_level(logging.WARNING, logger="hf_knowedit"):
        first = _run(_settings(dataset, n=2), output)
    assert "holds 2 scored cases beyond the 2 selected now" in caplog.text and "--n 4 describes them all" in caplog.text
    assert first["num_completed"] == 2 and len(_records(output)) == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_knowedit"):
        again = _run(_settings(dataset, n=4), output)  # growing n again: nothing to warn about
        everything = _run(_settings(dataset, n=None), output)  # every case of the file
        _run(_settings(dataset, n=everything["num_cases"]), output)  # as many as there are: nothing left out
    assert "scored cases beyond" not in caplog.text
    assert again["num_completed"] == 4 and again["metrics"] == whole["metrics"]
    with caplog.at_level(logging.WARNING, logger="hf_knowedit"):
        _run(_settings(dataset, n=3), output)
    assert f"--n {everything['num_cases']} describes them all" in caplog.text


def test_resume_sequential_immediate(dataset, tmp_path):
    output = tmp_path / "seq"
    settings = _settings(dataset, "sequential", 2, "immediate")
    _run(settings, output)
    complete = {r["index"]: r["post"] for r in _records(output)}
    lines = (output / "results.jsonl").read_text().splitlines()
    (output / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")  # the first chunk survived
    _run(settings, output)
    records = {r["index"]: r for r in _records(output)}
    assert sorted(records) == [0, 1, 2, 3, 4]
    for index in range(5):  # the first edits are recomputed, so later chunks see the same model state
        assert records[index]["post"]["scores"]["reliability"] == complete[index]["scores"]["reliability"]


def test_resume_sequential_every_k_scores_the_same_checkpoints(dataset, tmp_path):
    """A stream stopped after its first checkpoint resumes at the next one, not right after its first new edit."""
    output = tmp_path / "seq"
    settings = _settings(dataset, "sequential", 1, "every:2")
    complete = _run(settings, output)
    curve = (output / "curve.jsonl").read_text().splitlines()
    (output / "curve.jsonl").write_text(curve[0] + "\n")  # stopped after the checkpoint at 2 edits
    (output / "results.jsonl").write_text("")
    resumed = _run(settings, output)
    assert [p["num_edits"] for p in resumed["curve"]] == [p["num_edits"] for p in complete["curve"]] == [2, 4, 5]
    assert curve_scores(resumed["curve"][1:]) == curve_scores(complete["curve"][1:])
    # every checkpoint times the edits so far, those recomputed on resuming included
    assert [p["edit_seconds_per_case"]["n"] for p in resumed["curve"]] == [2, 4, 5]
    assert all(p["edit_seconds_per_case"]["mean"] > 0 for p in resumed["curve"])


@pytest.mark.parametrize("key", [("single", 1, "final"), ("batch", 2, "final"), ("sequential", 1, "every:2"),
                                 ("sequential", 2, "immediate"), ("sequential", 1, "final")])
def test_a_refused_edit_is_scored_unedited_and_the_run_goes_on(dataset, tmp_path, monkeypatch, key):
    """A method that refuses an edit (`EditFailedError`, the model left as it was) does not stop the run: the case
    is scored without its edit, its record keeps the refusal's message, the summary and the curve count it."""
    from hf_knowedit.errors import EditFailedError
    from hf_knowedit.methods.ft.editor import FTEditor

    compute = FTEditor.compute_components

    def refusing(self, edited_model, requests):
        if any(r.subject == "Miles Davis" for r in requests):
            raise EditFailedError("no edit for Miles Davis")
        return compute(self, edited_model, requests)

    monkeypatch.setattr(FTEditor, "compute_components", refusing)
    mode, batch_size, schedule = key
    summary = _run(_settings(dataset, mode, batch_size, schedule), tmp_path / "run")
    records = {r["index"]: r for r in _records(tmp_path / "run")}
    refused = {0, 1} if batch_size == 2 else {1}  # case 1 shares its chunk with case 0 in batches of 2
    assert summary["complete"] and summary["edits_refused"] == len(refused)
    assert {i for i, r in records.items() if r["edit_refused"]} == refused
    assert all(records[i]["edit_refused"] == "no edit for Miles Davis" for i in refused)
    if mode != "sequential":  # scored on the untouched model: the post-edit scores are the pre-edit ones
        for i in refused:
            assert records[i]["post"]["scores"]["reliability"] == records[i]["pre"]["scores"]["reliability"]
            assert records[i]["edit_stats"] == {}
        assert summary["base_restored_checks"] == 5
        assert all(r["edit_stats"]["ft_steps"] >= 1 for i, r in records.items() if i not in refused)
    if schedule == "every:2":
        assert [p["edits_refused"] for p in summary["curve"]] == [1, 1, 1]
    assert f"| 5/5 ({len(refused)} refused) |" in markdown_tables(find_summaries([tmp_path / "run"]))


def test_refuses_to_mix_settings_unless_overwrite(dataset, tmp_path):
    output = tmp_path / "run"
    _run(_settings(dataset, n=2), output)
    with pytest.raises(EvaluationSettingsError, match="other settings.*mode"):
        _run(_settings(dataset, "batch", 2, n=2), output)
    summary = _run(_settings(dataset, "batch", 2, n=2), output, overwrite=True)
    assert summary["mode"] == "batch" and summary["num_completed"] == 2
    sequential = _settings(dataset, "sequential", 1, n=2)
    _run(sequential, tmp_path / "seq")
    with pytest.raises(EvaluationSettingsError, match="n: 2 there, 3 now"):  # sequential state depends on n
        _run(_settings(dataset, "sequential", 1, n=3), tmp_path / "seq")
    # the message names the config fields that differ, not the whole configs, and `n` as it was set in either mode
    other = _settings(dataset, n=3)
    other.config = {**CONFIG, "lr": 0.1, "layers": [0]}
    with pytest.raises(EvaluationSettingsError) as error:
        _run(other, tmp_path / "seq")
    details = str(error.value).split("other settings (")[1].split("). Use")[0]
    assert details == ("config.layers: None there, [0] now; config.lr: 0.05 there, 0.1 now; "
                       "mode: 'sequential' there, 'single' now; n: 2 there, 3 now")
    # a field that a run of an older version did not store
    assert _differences("config", {"lr": 0.1}, {"lr": 0.1, "rank": 2}) == "config.rank: (not set) there, 2 now"


def test_resumes_a_run_made_before_its_method_config_gained_a_field(dataset, tmp_path):
    """A field added to a config class since a run was made changes nothing the run computes when it is left at its
    default; set to another value, it is a difference like any other."""
    output = tmp_path / "run"
    _run(_settings(dataset, n=2), output)

    def drop_variant():  # as a version without the field stored the settings
        stored = json.loads((output / "settings.json").read_text())
        assert stored["config"]["variant"] == "ft_m"  # the field's default, stored by this version
        del stored["config"]["variant"]
        (output / "settings.json").write_text(json.dumps(stored))

    drop_variant()
    assert _run(_settings(dataset, n=3), output)["num_completed"] == 3
    drop_variant()
    other = _settings(dataset, n=3)
    other.config = {**CONFIG, "variant": "ft_l"}
    with pytest.raises(EvaluationSettingsError, match="config.variant: 'ft_m' there, 'ft_l' now"):
        _run(other, output)


def test_a_run_records_its_trained_editor_and_refuses_one_trained_again(dataset, tmp_path):
    """A learned method's config names its editor by path; the run records the editor's weights, so that an editor
    trained again at that path is not mixed into a run begun with the other one, and reports tell the runs apart."""
    from hf_knowedit.training import EditorTrainingArguments, editor_identity, train_editor

    requests = load_edit_dataset(dataset)
    editor_dir = tmp_path / "mend-tiny"

    def train(steps):
        shutil.rmtree(editor_dir, ignore_errors=True)
        train_editor("mend", tiny_model("llama"), tiny_tokenizer(), requests, editor_dir,
                     args=EditorTrainingArguments(batch_size=2, validation_size=1), max_steps=steps)
        return editor_identity(editor_dir)

    first = train(1)
    assert first["steps"] == 1 and first["status"] == "completed" and len(first["sha256"]) == 64

    def settings(n):
        return EvaluationSettings(method="mend", config={"editor": str(editor_dir)}, model="tiny-llama",
                                  dataset=dataset, n=n, fluency_tokens=0, protocols=["token_accuracy"])

    output = tmp_path / "run"
    summary = _run(settings(1), output)
    assert summary["editor"] == first
    assert json.loads((output / "settings.json").read_text())["editor"] == first
    assert train(1) == first  # trained again for the same steps: the same weights (the file's bytes differ)
    assert _run(settings(2), output)["num_completed"] == 2  # the same editor: resumed
    second = train(2)
    assert second["sha256"] != first["sha256"]
    with pytest.raises(EvaluationSettingsError, match=f"trained editor .*{first['sha256'][:12]}... \\(1 steps\\) "
                                                      f"there, {second['sha256'][:12]}... \\(2 steps\\) now"):
        _run(settings(3), output)
    assert len(_records(output)) == 2  # nothing of the refused run was written
    _run(settings(1), tmp_path / "again")  # a new run with the new editor

    # a run made before runs recorded their editor: its edits' editor cannot be told, so it does not go on
    stored = json.loads((output / "settings.json").read_text())
    del stored["editor"]
    (output / "settings.json").write_text(json.dumps(stored))
    with pytest.raises(EvaluationSettingsError, match="not recorded there .* cannot be told"):
        _run(settings(3), output)
    (output / "results.jsonl").unlink()  # ... unless it had edited nothing yet
    assert _run(settings(3), output)["editor"] == second
    assert json.loads((output / "settings.json").read_text())["editor"] == second

    # the report tells the two runs apart by their editors' weights
    runs = [(output, json.loads((output / "summary.json").read_text())),
            (tmp_path / "again", json.loads((tmp_path / "again" / "summary.json").read_text()))]
    runs[0][1]["editor"] = first
    assert config_variant_names(runs) == [f"MEND (editor_weights={first['sha256'][:12]})",
                                          f"MEND (editor_weights={second['sha256'][:12]})"]
    assert f"trained editor {second['sha256'][:12]} (2 steps)" in markdown_tables(runs[1:])
    del runs[0][1]["editor"]  # a summary written before runs recorded their editor
    assert config_variant_names(runs)[0] == "MEND (editor_weights=unrecorded)"


def test_a_run_refuses_a_changed_file_its_config_names(dataset, tmp_path):
    """IKE's demonstrations (a config field `*_file`) changed under the same path: the run does not go on with
    them; the same file under another path does."""
    demonstrations = tmp_path / "demonstrations.json"
    demonstrations.write_text(json.dumps(CASES))

    def settings(path, n):
        return EvaluationSettings(method="ike", config={"demonstrations_file": str(path), "num_demonstrations": 2},
                                  model="tiny-llama", dataset=dataset, n=n, fluency_tokens=0,
                                  protocols=["token_accuracy"])

    output = tmp_path / "run"
    _run(settings(demonstrations, 1), output)
    digest = hashlib.sha256(demonstrations.read_bytes()).hexdigest()
    assert json.loads((output / "settings.json").read_text())["config_files_sha256"] == {
        "demonstrations_file": digest}
    moved = tmp_path / "moved.json"
    shutil.copy(demonstrations, moved)
    assert _run(settings(moved, 2), output)["num_completed"] == 2
    moved.write_text(json.dumps(CASES[:4]))
    with pytest.raises(EvaluationSettingsError, match=f"config.demonstrations_file: the file .*moved.json' changed "
                                                      f"\\(SHA-256 {digest[:12]}... there"):
        _run(settings(moved, 3), output)
    assert len(_records(output)) == 2


def test_resumes_when_the_same_dataset_is_named_by_another_path_not_when_it_changed(dataset, tmp_path, monkeypatch):
    output = tmp_path / "run"
    _run(_settings(dataset, n=2), output)
    monkeypatch.chdir(Path(dataset).parent)
    summary = _run(_settings(Path(dataset).name, n=3), output)  # relative now, absolute then: resumed
    assert summary["num_completed"] == 3
    changed = tmp_path / "changed.jsonl"
    changed.write_text(Path(dataset).read_text().replace("Rome", "Milan"))
    with pytest.raises(EvaluationSettingsError, match="other settings.*dataset"):
        _run(_settings(str(changed), n=3), output)
    # a file changed under the path the run was made with
    copy = tmp_path / "copy.jsonl"
    shutil.copy(dataset, copy)
    _run(_settings(str(copy), n=2), tmp_path / "copied")
    copy.write_text(changed.read_text())
    with pytest.raises(EvaluationSettingsError, match="dataset: the file .*copy.jsonl' changed \\(SHA-256"):
        _run(_settings(str(copy), n=3), tmp_path / "copied")


def test_bad_inputs(dataset, tmp_path):
    with pytest.raises(DatasetSelectionError, match="holds only 5"):
        _run(_settings(dataset, n=50), tmp_path / "a")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"question": "?", "label": 1}]))
    with pytest.raises(DatasetFormatError):
        _run(_settings(str(unknown), n=1), tmp_path / "b")
    with pytest.raises(EvaluationSettingsError, match="every:K"):
        _settings(dataset, schedule="sometimes")
    with pytest.raises(EvaluationSettingsError, match="needs mode 'sequential'"):
        _settings(dataset, "batch", 2, "every:2")
    with pytest.raises(EditConfigError, match="no field 'steps'"):
        build_config("ft", overrides={"steps": 3})
    assert parse_overrides(["num_steps=3", "layers=[1]", "variant=ft_l"]) == {
        "num_steps": 3, "layers": [1], "variant": "ft_l"}
    assert build_config("ft", overrides={"variant": "ft_l"}).norm_constraint == 5e-4
    assert mean_ci([1.0, 0.0])["ci95"] == pytest.approx([0.5 - 1.96 * 0.5, 0.5 + 1.96 * 0.5])


def test_scores_get_intervals_inside_zero_one():
    # Every case scored 1: Wilson's lower end is n / (n + z^2), not the mean itself.
    assert mean_ci([1.0] * 20, bounded=True)["ci95"] == pytest.approx([20 / (20 + 1.96**2), 1.0])
    assert mean_ci([0.0] * 20, bounded=True)["ci95"] == pytest.approx([0.0, 1 - 20 / (20 + 1.96**2)])
    # p = 1/2 over 4 cases, by hand: half-width 1.96 / (1 + z^2/4) * sqrt(1/16 + z^2/64) = 0.34997.
    entry = mean_ci([1.0, 0.0, 1.0, 0.0], bounded=True)
    assert entry["ci95"] == pytest.approx([0.15003, 0.84997], abs=1e-5) and entry["interval"] == "wilson"
    # Fractional scores: the normal approximation (s = 0.25, half-width 1.96 * 0.25 / 2), clipped to [0, 1].
    entry = mean_ci([1.0, 1.0, 1.0, 0.5], bounded=True)
    assert entry["ci95"] == pytest.approx([0.875 - 1.96 * 0.25 / 2, 1.0]) and entry["interval"] == NORMAL_CLIPPED
    assert mean_ci([2.0, 4.0])["interval"] == "normal"
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        mean_ci([0.5, 1.5], bounded=True)


def test_refreshing_an_old_summary_gives_the_intervals_of_a_new_one():
    old = {"mean": 0.9, "ci95": [0.8, 1.1], "n": 5}  # a normal approximation, past 1
    all_one = {"mean": 1.0, "ci95": [1.0, 1.0], "n": 20}
    fluency = {"mean": 5.2, "ci95": [5.0, 5.4], "n": 5}
    summary = {"metrics": {"post": {"reliability": {"token_accuracy": dict(all_one), "prob_comparison": dict(old)},
                                    "fluency": {"ngram_entropy": dict(fluency)}}, "pre": {}},
               "curve": [{"num_edits": 5, "metrics": {"reliability": {"token_accuracy": dict(all_one)}}}]}
    refresh_intervals(summary)
    post = summary["metrics"]["post"]
    assert post["reliability"]["token_accuracy"] == mean_ci([1.0] * 20, bounded=True)
    assert summary["curve"][0]["metrics"]["reliability"]["token_accuracy"] == mean_ci([1.0] * 20, bounded=True)
    assert post["reliability"]["prob_comparison"]["ci95"] == [0.8, 1.0]
    assert post["fluency"]["ngram_entropy"]["ci95"] == [5.0, 5.4]
    assert refresh_intervals(json.loads(json.dumps(summary))) == summary  # entries that name their interval stay
    # Tables show the distance to the farther end of a lopsided interval.
    assert _cell(summary, "reliability", "token_accuracy") == "100.0 ± 16.1"


def test_an_interrupted_stream_is_shown_at_its_last_checkpoint_with_its_refusals():
    from hf_knowedit.evaluation.report import _latest_checkpoint

    seconds = {"mean": 2.5, "ci95": [2.0, 3.0], "n": 3}
    point = {"num_edits": 3, "edits_refused": 2, "metrics": {"reliability": {"token_accuracy": {"mean": 0.5}}},
             "edit_seconds_per_case": seconds}
    summary = {"mode": "sequential", "complete": False, "num_completed": 0, "edits_refused": 0,
               "metrics": {"pre": {}, "post": {}}, "efficiency": {"edit_seconds_per_case": {"mean": None}},
               "curve": [{"num_edits": 1, "edits_refused": 0, "metrics": {}}, point]}
    shown = _latest_checkpoint(summary)
    assert (shown["num_completed"], shown["edits_refused"], shown["metrics"]["post"]) == (3, 2, point["metrics"])
    assert shown["efficiency"]["edit_seconds_per_case"] == seconds
    assert shown["efficiency"]["edit_seconds_total"] == pytest.approx(7.5)
    # a checkpoint written before checkpoints were timed keeps the summary's (empty) figure
    del point["edit_seconds_per_case"]
    assert _latest_checkpoint(summary)["efficiency"] == summary["efficiency"]


def test_methods_are_labelled_as_their_papers_spell_them(tmp_path):
    assert default_label("tpatcher", {}) == "T-Patcher" and default_label("alphaedit", {}) == "AlphaEdit"
    assert default_label("rome", {}) == "ROME" and default_label("ft", {"variant": "ft_l"}) == "FT-L"
    # A run labelled by the earlier default (the name in capitals) is shown with today's; a chosen label is kept.
    old = {"method": "tpatcher", "method_label": "TPATCHER", "mode": "single", "metrics": {"post": {}, "pre": {}}}
    chosen = {**old, "method_label": "TPATCHER, memory set"}
    for name, summary in (("old", old), ("chosen", chosen)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    assert [s["method_label"] for _, s in find_summaries([tmp_path])] == ["TPATCHER, memory set", "T-Patcher"]


def test_batch_scorer_matches_one_prompt_at_a_time():
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    prompts = ["The capital of France is", "A", "Miles Davis plays the", "The capital of France is"]
    targets = ["Paris", "long target with several tokens", "trumpet", "Paris"]
    batched = BatchScorer(model, tokenizer, batch_size=8)
    single = BatchScorer(model, tokenizer, batch_size=1)
    for a, b in zip(batched.score_targets(prompts, targets), single.score_targets(prompts, targets)):
        assert a.predicted_ids == b.predicted_ids and a.target_ids == b.target_ids
        assert a.mean_log_prob == pytest.approx(b.mean_log_prob, abs=1e-4)
    tokenizer.padding_side = "right"
    assert batched.generate(prompts, [4, 2, 3, 4]) == single.generate(prompts, [4, 2, 3, 4])
    assert tokenizer.padding_side == "right"  # restored after left-padded generation
    assert batched.generate(prompts, 3)[0] == batched.generate(prompts[:1], 3)[0]
    with torch.no_grad():
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        greedy = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert batched.generate(prompts[:1], 4)[0] == tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)


def test_cli_and_report(runs, dataset, tmp_path):
    root, _ = runs
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    add_evaluate_parser(subparsers)
    add_report_parser(subparsers)
    args = parser.parse_args(["evaluate", "--method", "ft", "--dataset", dataset, "--output", str(tmp_path / "x"),
                              "--set", "num_steps=2", "--n", "2", "--mode", "batch", "--batch-size", "2"])
    assert args.func is not None and args.batch_size == 2 and args.overrides == ["num_steps=2"]
    report_dir = tmp_path / "report"
    files = write_report([root], report_dir)
    names = sorted(p.name for p in files)
    assert names == ["efficiency.png", "metrics_vs_edits_cases.png", "report.md"]
    for path in files:
        assert path.stat().st_size > 1000 if path.suffix == ".png" else path.stat().st_size > 0
    text = (report_dir / "report.md").read_text()
    assert "| Method | cases Rel. | cases Gen. | cases Loc. | cases Port. |" in text
    assert "| FT-M |" in text and text.count("| FT-M | cases |") == 4
    args = parser.parse_args(["report", str(root), "--output", str(tmp_path / "report2")])
    assert args.func(args) == 0 and (tmp_path / "report2" / "report.md").is_file()
    with pytest.raises(EvaluationSettingsError, match="not an evaluation run"):
        write_report([tmp_path / "nothing"], tmp_path / "r3")


# A chat template in the style of most instruction-tuned models: the user's turn, then the assistant's opening.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _chat_tokenizer(template=CHAT_TEMPLATE):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def _chat(prompt):
    return f"<|user|>{prompt}\n<|assistant|>"


def test_chat_template_is_applied_to_every_prompt_and_to_the_edit(dataset, tmp_path, monkeypatch):
    requests = apply_chat_template(load_edit_dataset(dataset), _chat_tokenizer())
    first = requests[0]
    assert first.filled_prompt == _chat("The capital of Atlantis is")
    start, end = first.subject_span
    assert first.filled_prompt[start:end] == "Atlantis"
    assert first.rephrase_prompts == [_chat("Atlantis has its capital in")]
    assert [(p.prompt, p.answer) for p in first.locality] == [(_chat("The capital of Spain is"), "Madrid")]
    assert first.portability[0].prompt == _chat("The capital of Atlantis is on the river")
    assert (first.target_new, first.target_true) == ("Paris", "Rome")

    edited_prompts = []
    add_edits = EditedModel.add_edits

    def spy(self, config, requests, **kwargs):
        edited_prompts.extend(r.filled_prompt for r in requests)
        return add_edits(self, config, requests, **kwargs)

    monkeypatch.setattr(EditedModel, "add_edits", spy)
    chat = run_evaluation(_settings(dataset, n=2, chat_template=True), tmp_path / "chat", model=tiny_model("llama"),
                          tokenizer=_chat_tokenizer())
    assert edited_prompts == [r.filled_prompt for r in requests[:2]]  # the edit is made on the templated prompt
    assert chat["settings"]["chat_template"] is True
    assert chat["chat_template"]["edit_prompts"] == "templated"
    assert chat["chat_template"]["template_sha256"] == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    assert chat["chat_template"]["example_prompt"] == first.filled_prompt
    plain = _run(_settings(dataset, n=2), tmp_path / "plain")
    assert plain["chat_template"] is None
    assert chat["metrics"]["pre"]["reliability"] != plain["metrics"]["pre"]["reliability"]  # other prompts scored
    with pytest.raises(EvaluationSettingsError, match="chat_template: True there, False now"):
        _run(_settings(dataset, n=2), tmp_path / "chat")

    with pytest.raises(ChatTemplateError, match="has none"):
        _run(_settings(dataset, n=1, chat_template=True), tmp_path / "none")
    with pytest.raises(ChatTemplateError, match="exactly one"):
        apply_chat_template(requests[:1], _chat_tokenizer("{} " + CHAT_TEMPLATE))
    with pytest.raises(EvaluationSettingsError, match="chat_template must be True or False"):
        _settings(dataset, chat_template="yes")
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--dataset", dataset, "--output", "x", "--chat-template"])
    assert args.chat_template


def test_a_run_records_the_corpus_of_its_statistics(dataset, tmp_path, monkeypatch):
    """ROME's edits depend on the corpus of its second-moment statistics, which a config names by path (or leaves to
    $HF_KNOWEDIT_STATS_CORPUS): the run records the corpus by content, resumes with the same texts elsewhere, and
    refuses other texts."""
    from hf_knowedit.statistics import CORPUS_ENV, corpus_identity

    monkeypatch.setenv("HF_KNOWEDIT_STATS_CACHE", str(tmp_path / "stats"))
    words = ["river", "stone", "city", "music", "light", "winter", "garden", "paper", "engine", "forest"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(f"The {words[i % 10]} of the {words[i * 7 % 10]} is {words[i * 3 % 10]}."
                                              for i in range(400)), encoding="utf-8")
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)

    def settings(n, stats_corpus=None):
        config = {"stats_corpus": stats_corpus and str(stats_corpus), "mom2_num_tokens": 1024, "v_num_grad_steps": 2,
                  "num_context_prefixes": 1, "context_prefix_length": 2}
        return EvaluationSettings(method="rome", config=config, model="tiny-llama", dataset=dataset, n=n,
                                  fluency_tokens=0, protocols=["token_accuracy"])

    output = tmp_path / "run"
    _run(settings(1, corpus), output)
    recorded = json.loads((output / "settings.json").read_text())["statistics_corpus"]
    assert recorded["files"] == ["a.txt"] and recorded["path"] == str(corpus.resolve())
    assert recorded["fingerprint"] == corpus_identity(copy)["fingerprint"]  # by content, not by path or time
    assert _run(settings(2, copy), output)["num_completed"] == 2  # the same texts elsewhere: resumed
    (copy / "a.txt").write_text("Other texts entirely.\n\n" * 300, encoding="utf-8")
    with pytest.raises(EvaluationSettingsError, match=f"statistics corpus: .*{recorded['fingerprint'][:12]}.* there"):
        _run(settings(3, copy), output)
    assert len(_records(output)) == 2
    # the corpus named by the environment (the config leaves it to the default) is recorded the same way
    monkeypatch.setenv(CORPUS_ENV, str(corpus))
    _run(settings(1), tmp_path / "env")
    assert json.loads((tmp_path / "env" / "settings.json").read_text())["statistics_corpus"]["fingerprint"] == (
        recorded["fingerprint"])
    monkeypatch.setenv(CORPUS_ENV, str(copy))
    with pytest.raises(EvaluationSettingsError, match="statistics corpus"):
        _run(settings(2), tmp_path / "env")
    # a run made before runs recorded their corpus goes on (its earlier edits' corpus cannot be checked)
    monkeypatch.setenv(CORPUS_ENV, str(corpus))
    stored = json.loads((tmp_path / "env" / "settings.json").read_text())
    del stored["statistics_corpus"]
    (tmp_path / "env" / "settings.json").write_text(json.dumps(stored))
    assert _run(settings(2), tmp_path / "env")["num_completed"] == 2
    # methods without statistics record none
    _run(_settings(dataset, n=1), tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / "settings.json").read_text())["statistics_corpus"] is None


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_the_editor_does_not_see_the_probes_it_is_scored_on(dataset, tmp_path, monkeypatch, mode):
    seen = []
    add_edits = EditedModel.add_edits

    def spy(self, config, requests, **kwargs):
        seen.extend(requests)
        return add_edits(self, config, requests, **kwargs)

    monkeypatch.setattr(EditedModel, "add_edits", spy)
    _run(_settings(dataset, mode, n=2), tmp_path / "hidden")
    cases = load_edit_dataset(dataset)[:2]
    assert [(r.filled_prompt, r.target_new, r.target_true) for r in seen] == \
        [(c.filled_prompt, c.target_new, c.target_true) for c in cases]
    assert not any(r.rephrase_prompts or r.locality or r.portability for r in seen)
    seen.clear()
    summary = _run(_settings(dataset, mode, n=2, editor_sees_probes=True), tmp_path / "shown")
    assert seen == cases and summary["settings"]["editor_sees_probes"] is True
    with pytest.raises(EvaluationSettingsError, match="editor_sees_probes: True there, False now"):
        _run(_settings(dataset, mode, n=2), tmp_path / "shown")
    settings = json.loads((tmp_path / "shown" / "settings.json").read_text())
    del settings["editor_sees_probes"]  # a run made before the setting existed gave the editor every probe
    (tmp_path / "shown" / "settings.json").write_text(json.dumps(settings))
    _run(_settings(dataset, mode, n=2, editor_sees_probes=True), tmp_path / "shown")
    with pytest.raises(EvaluationSettingsError, match="editor_sees_probes must be True or False"):
        _settings(dataset, editor_sees_probes="no")
    table = markdown_tables(find_summaries([tmp_path / "hidden", tmp_path / "shown"]))
    rows = [line for line in table.splitlines() if line.startswith("| FT") and f"| {mode}" in line]
    assert sorted(f"| {mode} †" in row for row in rows) == [False, True]
    assert "† The editor was given the rephrase, locality and portability prompts" in table


def test_editor_requests_and_the_cases_left_out_for_contradicting_others(dataset):
    # the two steps of the harness's apply_edits that scripts rebuilding a run's edits (fill_target_values.py) share
    cases = load_edit_dataset(dataset)[:2]
    hidden = editor_requests(cases)
    assert [(r.filled_prompt, r.subject, r.target_new) for r in hidden] == \
        [(c.filled_prompt, c.subject, c.target_new) for c in cases]
    assert not any(r.rephrase_prompts or r.locality or r.portability for r in hidden)
    assert any(c.rephrase_prompts or c.locality for c in cases)  # the inputs are left as they were
    assert editor_requests(cases, sees_probes=True) == cases
    other = replace(cases[0], target_new=cases[0].target_new + " again")
    requests = [cases[0], cases[1], other]
    with pytest.raises(ContradictoryRequestsError) as caught:
        check_consistent_requests(requests)
    assert contradicting_cases([10, 11, 12], caught.value) == {12: 10}
    assert contradicting_cases([10, 11, 12], ContradictoryRequestsError("none", [])) == {}


def test_chat_template_bos_is_not_doubled():
    tokenizer = _chat_tokenizer("{{ bos_token }}" + CHAT_TEMPLATE)
    assert chat_prompt(tokenizer, "Hi") == "<|endoftext|>" + _chat("Hi")  # GPT-2 adds no BOS: the template's stays
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", 50256)])
    prompt = chat_prompt(tokenizer, "Hi")  # a tokenizer that adds its BOS (as Llama's does): the template's is dropped
    assert prompt == _chat("Hi") and tokenizer(prompt)["input_ids"].count(tokenizer.bos_token_id) == 1


def test_model_loaded_by_the_harness_in_the_given_dtype_and_device_map(dataset, tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny-llama")
    settings = EvaluationSettings(method="ft", config=dict(CONFIG), model=str(model_dir), dataset=dataset, n=2,
                                  fluency_tokens=0, protocols=["token_accuracy"], dtype="bfloat16", device_map="cpu")
    summary = run_evaluation(settings, tmp_path / "run")
    assert summary["environment"]["model_dtype"] == "torch.bfloat16" and summary["num_completed"] == 2
    first = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert "fluency_text" not in first["post"] and "fluency" not in first["post"]["scores"]  # fluency_tokens=0
    stored = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert stored["dtype"] == "bfloat16" and stored["device_map"] == "cpu"
    # The device map is not part of what a resumed run must share; the dtype is.
    settings.device_map = None
    run_evaluation(settings, tmp_path / "run")
    settings.dtype = "float32"
    with pytest.raises(EvaluationSettingsError, match="dtype"):
        run_evaluation(settings, tmp_path / "run")
    with pytest.raises(EvaluationSettingsError, match="dtype must be"):
        EvaluationSettings(method="ft", config={}, model="m", dataset=dataset, dtype="int8")


def _table_summary(method: str, completed: int, pre_reliability: float) -> dict:
    stats = lambda mean: {"mean": mean, "ci95": [mean, mean]}  # noqa: E731
    return {"method_label": method, "dataset_name": "cf", "mode": "single", "batch_size": 1, "eval_schedule": "final",
            "num_completed": completed, "num_cases": completed, "settings": {"editor_sees_probes": False},
            "metrics": {"pre": {"reliability": {"token_accuracy": stats(pre_reliability)}},
                        "post": {"reliability": {"token_accuracy": stats(1.0)}}},
            "efficiency": {"edit_seconds_per_case": {"mean": 1.0}, "rss_peak_bytes": None}}


def test_plot_lines_and_bars_that_share_a_name_say_what_tells_them_apart(tmp_path):
    """Batch runs of one config join one line; each sequential run is its own; two lines or bars of one method that
    would share a name get the config fields (or settings) that differ, else their run directory."""
    def summary(mode, batch, config, sees_probes=False):
        entry = _table_summary("TP", 5, 0.1)
        entry.update(mode=mode, batch_size=batch, method_config=config, settings={"editor_sees_probes": sees_probes})
        return entry

    runs = [(tmp_path / "b1", summary("single", 1, {"lr": 0.1})), (tmp_path / "b10", summary("batch", 10, {"lr": 0.1})),
            (tmp_path / "b10_probes", summary("batch", 10, {"lr": 0.1}, sees_probes=True)),
            (tmp_path / "seq_a", summary("sequential", 1, {"lr": 0.1, "memory_file": "/data/train.json"})),
            (tmp_path / "seq_b", summary("sequential", 1, {"lr": 0.1, "memory_file": None})),
            (tmp_path / "seq_c", summary("sequential", 1, {"lr": 0.1, "memory_file": None}))]
    line = lambda s: f"{s['method_label']} {s['mode'] if s['mode'] != 'single' else 'batch'}"  # noqa: E731
    assert _distinct_names(runs, line, _series_key) == [
        "TP batch (editor_sees_probes=false)", "TP batch (editor_sees_probes=false)",
        "TP batch (editor_sees_probes=true)", "TP sequential (seq_a)", "TP sequential (seq_b)", "TP sequential (seq_c)"]
    assert _distinct_names(runs[3:5], line, _series_key) == [
        "TP sequential (memory_file=train.json)", "TP sequential (memory_file=null)"]
    assert _distinct_names(runs[:2], line, _series_key) == ["TP batch", "TP batch"]
    bars = _distinct_names(runs[1:3], lambda s: f"{s['method_label']} b{s['batch_size']}", lambda d, s: str(d))
    assert bars == ["TP b10 (editor_sees_probes=false)", "TP b10 (editor_sees_probes=true)"]
    assert [p.name for p in plot_metrics_vs_edits(runs, tmp_path)] == ["metrics_vs_edits_cf.png"]


def test_table_of_all_runs_names_the_config_that_tells_runs_of_one_method_apart():
    """Two IKE runs with different demonstrations get the file in their label; a method with one config keeps its
    label alone; the main table keeps one row per method."""
    def summary(method, config):
        return {**_table_summary(method, 5, 0.1), "method_config": config}

    runs = [(Path("runs/ike_cf"), summary("IKE", {"demonstrations_file": "/data/counterfact-train.json", "k": 16})),
            (Path("runs/ike_zsre"), summary("IKE", {"demonstrations_file": "/data/zsre_train.json", "k": 16})),
            (Path("runs/rome"), summary("ROME", {"layers": [4]}))]
    table = markdown_tables(runs)
    rows = [line.split(" | ")[0] for line in table.split("All runs:")[1].splitlines() if line.startswith("| ")][1:]
    assert rows == ["| IKE (demonstrations_file=counterfact-train.json)", "| IKE (demonstrations_file=zsre_train.json)",
                    "| ROME"]
    main = table.split("All runs:")[0]
    assert "| IKE | " in main and "demonstrations_file" not in main


def test_a_config_field_added_after_a_run_at_its_default_tells_no_runs_apart():
    """A KN run stored before `layers_per_pass` existed and one made after, at its default, are one config; another
    value of the field is a variant."""
    def summary(path, config):
        return Path(path), {**_table_summary("KN", 5, 0.1), "method": "kn", "method_config": config}

    older = {"steps": 20, "attribution_threshold": 0.2}
    runs = [summary("runs/kn_old", older), summary("runs/kn_new", {**older, "layers_per_pass": 8})]
    assert config_variant_names(runs) == ["KN", "KN"]
    runs.append(summary("runs/kn_other", {**older, "layers_per_pass": 2}))
    assert config_variant_names(runs) == ["KN (layers_per_pass=8)", "KN (layers_per_pass=8)", "KN (layers_per_pass=2)"]


def test_an_int_stored_for_a_float_field_tells_no_runs_apart():
    """A run whose config file said `"attribution_threshold": 1` and one that said 1.0 ran the same config."""
    def summary(path, threshold):
        config = {"steps": 20, "attribution_threshold": threshold}
        return Path(path), {**_table_summary("KN", 5, 0.1), "method": "kn", "method_config": config}

    runs = [summary("runs/kn_int", 1), summary("runs/kn_float", 1.0)]
    assert config_variant_names(runs) == ["KN", "KN"]
    runs.append(summary("runs/kn_other", 0.2))
    assert config_variant_names(runs) == ["KN (attribution_threshold=1.0)", "KN (attribution_threshold=1.0)",
                                          "KN (attribution_threshold=0.2)"]


def test_unedited_row_comes_from_the_run_with_the_most_cases():
    runs = [(Path("runs/a"), _table_summary("A", 25, 0.10)), (Path("runs/b"), _table_summary("B", 200, 0.25))]
    table = markdown_tables(runs)
    unedited = next(line for line in table.splitlines() if line.startswith("| *unedited model*"))
    assert unedited.split(" | ")[1] == "25.0 ± 0.0"  # B's 200 cases, not A's 25 (A sorts first)
    assert "- *unedited model* / cf: the pre-edit scores of `runs/b` (200 cases)" in table


def _summary_rows_module():
    spec = importlib.util.spec_from_file_location(
        "summary_rows", Path(__file__).parents[1] / "benchmarks" / "results" / "summary_rows.py")
    summary_rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary_rows)
    return summary_rows


def test_results_page_rows_come_from_the_run_they_name(runs, tmp_path):
    """benchmarks/results/summary_rows.py, which make_results.py uses for the batch, sequential and fluency tables of
    docs/results.md, reads each figure from the run's summary."""
    summary_rows = _summary_rows_module()
    _, result = runs
    batch_dir = str(result[("batch", 2, "final")][0])
    summary = json.loads((Path(batch_dir) / "summary.json").read_text())
    cells = summary_rows.row("batch", "FT", batch_dir).split(" | ")
    reliability = summary["metrics"]["post"]["reliability"]["token_accuracy"]["mean"]
    assert cells[:4] == ["| FT", "2", "5", f"{100 * reliability:.1f}"] and cells[-1] == f"`{batch_dir}` |"
    sequential_dir = str(result[("sequential", 1, "every:2")][0])
    summary = json.loads((Path(sequential_dir) / "summary.json").read_text())
    last = summary["curve"][-1]["metrics"]["locality_unchanged"]["token_accuracy"]["mean"]
    cells = summary_rows.row("sequential", "FT (to 3 edits)", sequential_dir).split(" | ")
    assert cells[0] == "| FT" and cells[3] == f"{100 * last:.1f}" and cells[4] == "–"
    curve = summary_rows.curve_rows(sequential_dir)  # one row per checkpoint, the last one the run's end
    assert len(curve) == len(summary["curve"]) and curve[-1].split(" | ")[:4:3] == [
        f"| {summary['curve'][-1]['num_edits']}", f"{100 * last:.1f}"]
    with pytest.raises(ValueError, match="no checkpoints"):
        summary_rows.curve_rows(batch_dir)
    # a stream that stopped before its last case is labelled with the edits its last checkpoint saw
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "summary.json").write_text(json.dumps({**summary, "num_cases": 8, "complete": False}))
    cells = summary_rows.row("sequential", "FT", str(stopped)).split(" | ")
    assert cells[0] == f"| FT (to {summary['curve'][-1]['num_edits']} edits)"
    assert cells[5] == f"{summary['curve'][-1]['edit_seconds_per_case']['mean']:.2f}"  # its seconds so far
    fluency = json.loads((Path(batch_dir) / "summary.json").read_text())["metrics"]["post"]["fluency"]["ngram_entropy"]
    assert summary_rows.row("fluency", "FT", batch_dir).startswith(f"| FT | {fluency['mean']:.2f} ± ")
    # --cases: the figures of some cases of a run, from its records (all five give the summary's own)
    batch = json.loads((Path(batch_dir) / "summary.json").read_text())
    assert summary_rows.batch_cells(summary_rows.cases_slice(batch, batch_dir, 0, 5)) == summary_rows.batch_cells(batch)
    records = [json.loads(line) for line in (Path(batch_dir) / "results.jsonl").read_text().splitlines()]
    first_two = [r for r in records if r["index"] < 2]
    cells = summary_rows.batch_cells(summary_rows.cases_slice(batch, batch_dir, 0, 2))
    assert cells[1] == "2" and cells[6] == f"{sum(r['edit_seconds'] for r in first_two) / 2:.2f}"
    assert cells != summary_rows.batch_cells(batch)
    with pytest.raises(ValueError, match="no cases in 7:9"):
        summary_rows.cases_slice(batch, batch_dir, 7, 9)
    # --pre: the untouched model's figures on the run's cases; --kind edit_stats: each chunk's edit_stats
    pre = summary_rows.batch_cells(summary_rows.untouched_model(batch))
    assert pre[2] == f"{100 * batch['metrics']['pre']['reliability']['token_accuracy']['mean']:.1f}" and pre[4] == "–"
    stats_rows = summary_rows.edit_stats_rows(batch_dir)  # chunks of 2 of the 5 cases
    assert [r.split(" | ")[0] for r in stats_rows] == ["| 0-1", "| 2-3", "| 4-4"]
    chunk_stats = {r["chunk"]: r["edit_stats"] for r in records}
    assert f"ft_steps {chunk_stats[2]['ft_steps']}, " in stats_rows[2] and stats_rows[2].endswith(f"`{batch_dir}` |")
    with pytest.raises(ValueError, match="without edit_stats"):
        summary_rows.edit_stats_rows(sequential_dir)


def _make_results_module():
    spec = importlib.util.spec_from_file_location(
        "make_results", Path(__file__).parents[1] / "benchmarks" / "results" / "make_results.py")
    make_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_results)  # defines functions only: the page is rebuilt by main()
    return make_results


def _results_page(main_table: str, all_runs: str, batch_rows: str) -> str:
    return (f"# Results\n\n<!-- token_accuracy -->\n{main_table}<!-- /token_accuracy -->\n\n"
            f"<!-- prob_comparison -->\n{main_table}<!-- /prob_comparison -->\n\n<!-- all -->\n{all_runs}"
            f"<!-- /all -->\n\n<!-- rows batch -->\n| Method | Batch | Run |\n|---|---|---|\n{batch_rows}\n"
            "<!-- /rows -->\n\nThe runs are under `runs/counterfact/` and `runs/zsre/`.\n")


def test_results_page_rebuilt_by_make_results(runs, tmp_path, monkeypatch):
    """make_results.py's main() on a page naming runs that are here, one that is lost and one here part-way: it stops
    and names them; --partial recomputes the rows and main-table cells of the complete runs here and keeps the others;
    --allow-missing rebuilds from the runs here, dropping the lost run's rows; with only a GPU run lost, --partial
    draws the plots of the CPU runs in docs/report_all and leaves the GPU plots alone until no GPU run is missing."""
    make_results = _make_results_module()
    _, result = runs
    monkeypatch.chdir(tmp_path)
    single, batch = "runs/counterfact/ft_single", "runs/zsre/ft_batch2"
    shutil.copytree(result[("single", 1, "final")][0], single)
    shutil.copytree(result[("batch", 2, "final")][0], batch)
    fresh = make_results.report([single, batch], "token_accuracy")
    main_table = re.search(r"\| Method \| .*?\n\n", fresh, re.S).group(0)
    all_runs = re.search(r"\| Method \| Dataset \|.*?\n\n", fresh, re.S).group(0)
    fresh_rows = make_results.table_rows(all_runs)
    for run in (single, batch):  # the expected rows are the report's: check their Rel. cells against the summaries
        reliability = json.loads(Path(run, "summary.json").read_text())["metrics"]["post"]["reliability"][
            "token_accuracy"]
        assert fresh_rows[run].split(" | ")[6].startswith(f"{100 * reliability['mean']:.1f} ± ")
    ft, unedited = main_table.strip().splitlines()[2:]  # FT-M's row and the unedited model's
    old_ft = "| FT-M | " + " | ".join(["1.0 ± 0.1"] * (ft.count("|") - 2)) + " |"
    lost_main = old_ft.replace("FT-M", "KN").replace("1.0", "7.0")
    lost_row = fresh_rows[single].replace("FT-M", "KN").replace(single, "runs/counterfact/kn_single")
    stale = {run: "|".join(line.split("|")[:-3] + [" 9.99 ", line.split("|")[-2], ""]) for run, line in
             fresh_rows.items()}  # a stale Peak RSS cell
    header = "\n".join(all_runs.splitlines()[:2])
    page = _results_page(
        main_table.replace(ft, old_ft).replace(unedited, lost_main + "\n" + unedited),
        header + "\n" + "\n".join([stale[single], lost_row, stale[batch]]) + "\n\n",
        f"| FT | 0 | `{batch}` |\n| KN | 0 | `runs/zsre/kn_batch10` |")
    Path("docs").mkdir()
    Path("docs/results.md").write_text(page)
    with pytest.raises(SystemExit, match=r"not here: 2 \(runs/counterfact/kn_single, "
                       r"runs/zsre/kn_batch10\); here part-way, being made again: 0 "):
        make_results.main([])
    assert Path("docs/results.md").read_text() == page

    make_results.main(["--partial"])
    rebuilt = Path("docs/results.md").read_text()
    assert ft in rebuilt and old_ft not in rebuilt and lost_main in rebuilt  # the run here, the lost one kept
    assert fresh_rows[single] in rebuilt and fresh_rows[batch] in rebuilt and lost_row in rebuilt
    assert "| KN | 0 | `runs/zsre/kn_batch10` |" in rebuilt
    assert make_results.row("batch", "FT", batch) in rebuilt
    assert sorted(p.name for p in make_results.PARTIAL_PLOTS.iterdir()) == [
        "efficiency.png", "metrics_vs_edits_cases.png"]

    # the single-edit run made again, here part-way: its complete run's rows and cells stay until it completes
    Path("docs/results.md").write_text(page)
    summary = json.loads(Path(single, "summary.json").read_text())
    Path(single, "summary.json").write_text(json.dumps({**summary, "complete": False, "num_completed": 3}))
    with pytest.raises(SystemExit, match=r"being made again: 1 \(runs/counterfact/ft_single\)"):
        make_results.main([])
    make_results.main(["--partial"])
    rebuilt = Path("docs/results.md").read_text()
    assert old_ft in rebuilt and stale[single] in rebuilt and fresh_rows[batch] in rebuilt

    # --allow-missing: the tables of the runs here alone, the lost run's rows dropped
    Path(single, "summary.json").write_text(json.dumps(summary))
    make_results.main(["--allow-missing"])
    rebuilt = Path("docs/results.md").read_text()
    assert main_table in rebuilt and all_runs in rebuilt and make_results.row("batch", "FT", batch) in rebuilt
    assert "KN" not in rebuilt and "kn_" not in rebuilt

    # only a GPU run missing: --partial keeps its row and, every run of the CPU plots being here, draws those in
    # docs/report_all, not apart
    shutil.rmtree("docs/report_all")
    shutil.rmtree(make_results.PARTIAL_PLOTS)
    gpu_row = "| FT | 0 | `runs/gpu/counterfact/ft_single` |"
    page = _results_page(main_table, all_runs, f"| FT | 0 | `{batch}` |\n{gpu_row}")
    Path("docs/results.md").write_text(page)
    with pytest.raises(SystemExit, match=r"not here: 1 \(runs/gpu/counterfact/ft_single\); .* again: 0 "):
        make_results.main([])
    shutil.copytree(single, "runs/gpu/counterfact/ft_single_fp32")  # a GPU run here beside the lost one
    make_results.main(["--partial"])
    assert gpu_row in Path("docs/results.md").read_text()
    assert sorted(p.name for p in Path("docs/report_all").iterdir()) == [
        "efficiency.png", "metrics_vs_edits_cases.png"]
    assert not make_results.PARTIAL_PLOTS.exists()
    assert not Path("docs/report_gpu").exists()  # a GPU run missing: the GPU plots are left alone
    Path("docs/results.md").write_text(page.replace(gpu_row, "| FT | 0 | `runs/gpu/counterfact/ft_single_fp32` |"))
    make_results.main(["--partial"])  # no GPU run missing: drawn
    assert sorted(p.name for p in Path("docs/report_gpu").iterdir()) == [
        "efficiency.png", "metrics_vs_edits_cases.png"]


def test_a_run_made_again_part_way_is_told_apart_by_its_old_rows_cases_cell(tmp_path, monkeypatch):
    """make_results.being_redone: a run here part-way whose old row says a complete run made it ("n/n", with or
    without refused edits after it) is being made again; one whose old row was part-way too, or that is complete
    here, is not."""
    make_results = _make_results_module()
    monkeypatch.chdir(tmp_path)
    cells = {"a": ("500/500 (4 refused)", False), "b": ("200/200", False), "c": ("200/500 (1 refused)", False),
             "d": ("500/500", True)}
    lines = ["| Method | Dataset | Mode | Batch | Schedule | Cases | Run |", "|---|---|---|---|---|---|---|"]
    for name, (cases, complete) in cells.items():
        Path("runs", name).mkdir(parents=True)
        Path("runs", name, "summary.json").write_text(json.dumps({"complete": complete}))
        lines.append(f"| T-Patcher | zsre | sequential | 1 | every:100 | {cases} | `runs/{name}` |")
    assert make_results.being_redone("\n".join(lines) + "\n\n") == {"runs/a", "runs/b"}


def test_results_page_rebuilt_from_some_runs_keeps_the_rows_of_the_others():
    """make_results.py --partial: the table of all runs keeps the rows of runs this checkout lacks, replaces those of
    the runs it has, adds new ones, in the report's order (dataset, method, mode, batch, run), and keeps its † note
    while a row is marked †; the main tables take the cells of the single-edit runs it has and keep the others."""
    make_results = _make_results_module()
    head = "| Method | Dataset | Mode | Batch | Run |\n|---|---|---|---|---|\n"
    old = head + ("| ROME | cf | single † | 1 | `runs/cf/rome_single` |\n"
                  "| SERAC | cf | sequential | 1 | `runs/cf/serac_seq` |\n"
                  "| SERAC | zs | batch | 10 | `runs/zs/serac_b10` |\n\n† note\n\n")
    new = head + ("| SERAC | cf | batch | 100 | `runs/cf/serac_b100` |\n"
                  "| SERAC | cf | sequential † | 1 | `runs/cf/serac_seq` |\n"
                  "| GRACE | zs | sequential | 1 | `runs/zs/grace_seq` |\n\n")
    merged = make_results.merge_all_runs(old, new)
    assert merged == head + ("| ROME | cf | single † | 1 | `runs/cf/rome_single` |\n"
                             "| SERAC | cf | batch | 100 | `runs/cf/serac_b100` |\n"
                             "| SERAC | cf | sequential † | 1 | `runs/cf/serac_seq` |\n"
                             "| GRACE | zs | sequential | 1 | `runs/zs/grace_seq` |\n"
                             "| SERAC | zs | batch | 10 | `runs/zs/serac_b10` |\n\n† note\n\n")
    # once no row it keeps is marked †, its note goes too
    new = head + ("| ROME | cf | single | 1 | `runs/cf/rome_single` |\n"
                  "| SERAC | cf | sequential | 1 | `runs/cf/serac_seq` |\n\n")
    assert make_results.merge_all_runs(old, new).endswith("| SERAC | zs | batch | 10 | `runs/zs/serac_b10` |\n\n")
    # the main tables: the cells of the single-edit runs here replace the old ones, the others are kept
    head = "| Method | zs Rel. | zs Loc. | cf Rel. | cf Loc. |\n|---|---|---|---|---|\n"
    old = head + "| KN | 1 | 2 | 3 | 4 |\n| ROME | 5 | 6 | 7 | 8 |\n| *unedited model* | 9 | – | 10 | – |\n\n"
    new = ("| Method | cf Rel. | cf Loc. |\n|---|---|---|\n| GRACE | 11 | 12 |\n| ROME | 13 | – |\n"
           "| *unedited model* | 14 | – |\n\n")
    assert make_results.merge_main_table(old, new) == head + (
        "| GRACE | – | – | 11 | 12 |\n| KN | 1 | 2 | 3 | 4 |\n| ROME | 5 | 6 | 13 | 8 |\n"
        "| *unedited model* | 9 | – | 14 | – |\n\n")
    with pytest.raises(SystemExit, match="'xx Rel.'"):
        make_results.merge_main_table(old, "| Method | xx Rel. |\n|---|---|\n| ROME | 1 |\n\n")


def test_gpu_rows_compare_with_the_cpu_run_on_the_same_cases(runs, tmp_path, monkeypatch):
    """The GPU table of docs/results.md: a GPU run's figures, its peak GPU memory, and the edit seconds of the CPU run
    of the same name over the cases the GPU run edited; no CPU figure when the configs differ; a CPU run is refused."""
    summary_rows = _summary_rows_module()
    _, result = runs
    source = result[("batch", 2, "final")][0]
    monkeypatch.chdir(tmp_path)
    cpu, gpu = Path("runs/counterfact/ft_batch2"), Path("runs/gpu/counterfact/ft_batch2")
    shutil.copytree(source, cpu)
    gpu.mkdir(parents=True)
    records = [json.loads(line) for line in (cpu / "results.jsonl").read_text().splitlines()]
    (gpu / "results.jsonl").write_text("".join(json.dumps({**r, "edit_seconds": 0.5}) + "\n" for r in records[:2]))
    summary = json.loads((cpu / "summary.json").read_text())
    summary["environment"]["device"] = "cuda:0"
    summary["efficiency"].update(cuda_max_allocated_bytes=1.5e9, edit_seconds_per_case={"mean": 0.5})
    (gpu / "summary.json").write_text(json.dumps(summary))
    cells = summary_rows.row("gpu", "FT", str(gpu)).split(" | ")
    cpu_seconds = sum(r["edit_seconds"] for r in records[:2]) / 2
    assert cells[1:4] == ["batch 2", "fp32", str(summary["num_completed"])]
    assert cells[-5:-1] == ["0.50", f"{cpu_seconds:.2f}", f"{cpu_seconds / 0.5:.1f}x", "1.50"]
    assert summary_rows.row("batch", "FT", str(gpu)).split(" | ")[-2] == "1.50 GPU"
    summary["settings"]["config"] = {**summary["settings"]["config"], "lr": 123.0}
    (gpu / "summary.json").write_text(json.dumps(summary))
    assert summary_rows.row("gpu", "FT", str(gpu)).split(" | ")[-4:-2] == ["–", "–"]
    with pytest.raises(ValueError, match="not run on a GPU"):
        summary_rows.row("gpu", "FT", str(cpu))


def _png_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_plots_make_room_for_many_and_long_names(tmp_path):
    """The legend of a metrics plot goes under the plots, in columns, and is in the image; the efficiency plot grows by
    the width of long run names (its bars keep the figure's width) instead of cutting them off."""
    def runs(count, name):
        return [(tmp_path / f"r{i}", {**_table_summary(f"{name}{i}", 5, 0.1), "mode": "batch", "batch_size": 10})
                for i in range(count)]

    for name in ("few", "many", "long"):
        (tmp_path / name).mkdir()
    (few,) = plot_metrics_vs_edits(runs(2, "M"), tmp_path / "few")
    (many,) = plot_metrics_vs_edits(runs(30, "M"), tmp_path / "many")
    (long,) = plot_metrics_vs_edits(runs(30, "M" * 120), tmp_path / "long")
    assert _png_size(few)[1] < _png_size(many)[1] < _png_size(long)[1]  # 30 short names in columns, long in one
    (short_bars,) = plot_efficiency(runs(3, "M"), tmp_path / "few")
    (long_bars,) = plot_efficiency(runs(3, "M" * 120), tmp_path / "long")
    assert _png_size(long_bars)[0] > _png_size(short_bars)[0] + 110 * 0.05 * 100  # the names' width is added


def test_the_series_of_a_plot_take_ten_strong_hues_before_any_light_shade():
    styles = [series_style(i) for i in range(100)]
    colours = [colour for colour, _ in styles[:20]]
    assert sorted(colours) == list(range(20)) and {marker for _, marker in styles[:20]} == {"o"}
    assert [c // 2 for c in colours[:10]] == list(range(10)) and all(c % 2 == 0 for c in colours[:10])
    assert len(set(styles)) == 100  # then the twenty colours again, each with another marker


def test_efficiency_bars_name_runs_made_on_a_gpu(tmp_path):
    """A bar of the efficiency plot for a GPU run says GPU: its seconds are not comparable with a CPU run's."""
    cpu, gpu = _table_summary("ROME", 5, 0.1), _table_summary("ROME", 5, 0.1)
    gpu["environment"] = {"device": "cuda:0"}
    gpu["efficiency"] = {"edit_seconds_per_case": {"mean": 0.1}, "cuda_max_allocated_bytes": 2e9}
    cpu["environment"] = {"device": "cpu"}
    runs = [(tmp_path / "a", cpu), (tmp_path / "b", gpu), (tmp_path / "c", {**gpu, "method_label": "MEMIT"})]
    assert efficiency_names(runs) == ["ROME cf sin b1", "ROME cf sin b1 GPU", "MEMIT cf sin b1 GPU"]
    named = [(tmp_path / "d", {**cpu, "dataset_name": "counterfact-edit"}),
             (tmp_path / "e", {**cpu, "dataset_name": "a-dataset-file-with-a-long-name"})]
    assert efficiency_names(named) == ["ROME counterfact-edit sin b1", "ROME a-dataset-file-with… sin b1"]
    assert [p.name for p in plot_efficiency(runs, tmp_path)] == ["efficiency.png"]
