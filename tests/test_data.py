"""Tests of `hf_knowedit.data`: format detection and loading of the knowledge-editing datasets."""

import json
import logging
import os
from functools import cache
from pathlib import Path

import pytest

from hf_knowedit.data import (
    DATASET_FORMATS,
    DatasetFormatError,
    DatasetSelectionError,
    detect_format,
    load_edit_dataset,
)
from hf_knowedit.errors import EditRequestError
from hf_knowedit.requests import EditRequest, EvalPrompt


DATA_DIR = Path(
    os.environ.get("HF_KNOWEDIT_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)

REAL_FILES = {
    "counterfact_easyedit/counterfact-edit.json": "counterfact",
    "counterfact_easyedit/counterfact-train.json": "counterfact",
    "zsre/zsre_mend_train-1k.json": "zsre_mend",
    "knowedit/ZsRE-test-all.json": "knowedit",
    "knowedit/wiki_counterfact_train_cf.json": "knowedit",
    "knowedit/wiki_recent_recent_train.json": "knowedit",
    "knowedit/wikibio-train-all.json": "wikibio",
    "knowedit/wikibio-test-all.json": "wikibio",
}

# The keys holding each format's prompt, subject and new target, to predict from the raw JSON which records are valid.
_CORE_KEYS = {
    "counterfact": ("prompt", "subject", "target_new"),
    "zsre_mend": ("src", "subject", "alt"),
    "knowedit": ("prompt", "subject", "target_new"),
    "wikibio": ("text", "concept", "labels"),
}


# ---------------------------------------------------------------------------------------------------------------
# Helpers: an independent statement of the expected mapping, computed from the raw JSON
# ---------------------------------------------------------------------------------------------------------------


def _flat(value):
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _flat(item)]
    return [] if value is None else [value]


def _expected_answer(value):
    """A string stays a string; lists of (lists of) aliases become one flat list without blanks or duplicates."""
    if isinstance(value, list):
        aliases = list(dict.fromkeys(str(a) for a in _flat(value) if str(a).strip()))
        return aliases or None
    return value if value and value.strip() else None


def _expected_probes(categories):
    return [
        {"prompt": item["prompt"], "answer": _expected_answer(item["ground_truth"]), "kind": kind}
        for kind, items in (categories or {}).items()
        for item in items
    ]


def _expected(record, fmt, position):
    """The `EditRequest.to_dict()` expected for one raw record."""
    if fmt == "counterfact":
        return {
            "prompt": record["prompt"],
            "subject": record["subject"],
            "target_new": record["target_new"],
            "target_true": record["ground_truth"],
            "rephrase_prompts": [record["rephrase_prompt"]],
            "locality": [
                {"prompt": record["locality_prompt"], "answer": record["locality_ground_truth"], "kind": "Neighborhood"}
            ],
            "portability": [],
            "case_id": record["case_id"],
        }
    if fmt == "zsre_mend":
        return {
            "prompt": record["src"],
            "subject": record["subject"],
            "target_new": record["alt"],
            "target_true": record["answers"][0],
            "rephrase_prompts": [record["rephrase"]],
            "locality": [{"prompt": record["loc"], "answer": record["loc_ans"], "kind": "NQ"}],
            "portability": [],
            "case_id": position,
        }
    if fmt == "knowedit":
        truth = _expected_answer(record.get("ground_truth"))
        rephrase = record.get("rephrase_prompt")
        return {
            "prompt": record["prompt"],
            "subject": record["subject"],
            "target_new": record["target_new"],
            "target_true": truth[0] if isinstance(truth, list) else truth,
            "rephrase_prompts": [rephrase] if rephrase else [],
            "locality": _expected_probes(record["locality"]),
            "portability": _expected_probes(record["portability"]),
            "case_id": position,
        }
    assert fmt == "wikibio"
    return {
        "prompt": record["text"],
        "subject": record["concept"],
        "target_new": record["labels"],
        "target_true": None,
        "rephrase_prompts": [],
        "locality": _expected_probes(record["locality"]),
        "portability": [],
        "case_id": position,
    }


def _is_valid(record, fmt):
    prompt, subject, target = (record[key] for key in _CORE_KEYS[fmt])
    return bool(prompt.strip() and target.strip() and subject.strip() and subject.lower() in prompt.lower())


@cache
def _raw(name):
    with open(DATA_DIR / name, encoding="utf-8") as file:
        return json.load(file)


@cache
def _loaded(name):
    return tuple(load_edit_dataset(DATA_DIR / name))


requires_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"shared data folder not found at {DATA_DIR} (set HF_KNOWEDIT_DATA_DIR)"
)


def _file(name):
    if not (DATA_DIR / name).is_file():
        pytest.skip(f"{DATA_DIR / name} not found (set HF_KNOWEDIT_DATA_DIR)")
    return DATA_DIR / name


def _write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The real files
# ---------------------------------------------------------------------------------------------------------------


@requires_data
@pytest.mark.parametrize("name, fmt", REAL_FILES.items())
def test_real_file_detection(name, fmt):
    _file(name)
    assert detect_format(_raw(name)[0]) == fmt


@requires_data
@pytest.mark.parametrize("name, fmt", REAL_FILES.items())
def test_real_file_first_records(name, fmt):
    path = _file(name)
    raw = _raw(name)
    requests = load_edit_dataset(path, n=3)
    assert [r.to_dict() for r in requests] == [_expected(raw[i], fmt, i) for i in range(3)]
    assert load_edit_dataset(path, format=fmt, n=1)[0] == requests[0]


@requires_data
@pytest.mark.parametrize("name, fmt", REAL_FILES.items())
def test_real_file_whole(name, fmt):
    _file(name)
    raw = _raw(name)
    loaded = _loaded(name)
    valid = [i for i, record in enumerate(raw) if _is_valid(record, fmt)]
    assert len(loaded) == len(valid)
    if fmt != "counterfact":
        assert [r.case_id for r in loaded] == valid
    for request in loaded:
        assert request.subject in request.filled_prompt


@requires_data
def test_real_zsre_skips_empty_targets(caplog):
    name = "zsre/zsre_mend_train-1k.json"
    path = _file(name)
    empty = [i for i, record in enumerate(_raw(name)) if not record["alt"].strip()]
    assert empty  # the two records with alt == "" in this file
    with caplog.at_level(logging.WARNING, logger="hf_knowedit"):
        requests = load_edit_dataset(path)
    assert len(requests) == len(_raw(name)) - len(empty)
    assert f"Skipped {len(empty)} of the {len(_raw(name))}" in caplog.text
    assert all(f"record {i}" in caplog.text for i in empty)
    with pytest.raises(DatasetFormatError, match=f"Record {empty[0]} "):
        load_edit_dataset(path, skip_invalid=False)


@requires_data
def test_real_file_offset():
    name = "knowedit/wiki_recent_recent_train.json"
    path = _file(name)
    assert load_edit_dataset(path, n=4, offset=10) == list(_loaded(name)[10:14])
    assert load_edit_dataset(path, offset=len(_loaded(name)) - 2) == list(_loaded(name)[-2:])
    with pytest.raises(DatasetSelectionError, match=f"only {len(_loaded(name))} valid"):
        load_edit_dataset(path, n=len(_loaded(name)) + 1)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic records: one per format
# ---------------------------------------------------------------------------------------------------------------

COUNTERFACT = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux speaks",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What does UniFirst make?",
    "alt": "drone",
    "answers": ["uniform", "uniforms"],
    "loc": "nq question: who sings hey jude",
    "loc_ans": "The Beatles",
    "cond": "uniform >> drone || What is the product made by UniFirst?",
}
KNOWEDIT = {
    "subject": "Goursez Vreizh",
    "prompt": "The country of Goursez Vreizh is",
    "target_new": "Franche-Comté",
    "ground_truth": ["France", "French Republic"],
    "rephrase_prompt": "Goursez Vreizh belongs to the country",
    "locality": {
        "Relation_Specificity": [{"prompt": "The founder of Goursez Vreizh is", "ground_truth": [["Jean"], ["J."]]}],
        "Forgetfulness": {"prompt": "The members of Goursez Vreizh, which is not Jean, are", "ground_truth": "Paul"},
    },
    "portability": {
        "Reasoning": [{"prompt": "The capital of the country of Goursez Vreizh is", "ground_truth": "Besançon"}],
        "Logical_Generalization": [],
    },
}
WIKIBIO = {
    "text": "This is a Wikipedia passage about rick mahler. Rick Mahler was a pitcher.",
    "labels": "Mahler was drafted by the Braves.",
    "concept": "rick mahler",
    "locality": {"Relation_Specificity": [{"prompt": "The cause of death of rick mahler is", "ground_truth": ["MI"]}]},
}

EXPECTED = {
    "counterfact": EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        rephrase_prompts=["Danielle Darrieux speaks"],
        locality=[EvalPrompt("Michel Rocard is a native speaker of", "French", kind="Neighborhood")],
        case_id=7,
    ),
    "zsre_mend": EditRequest(
        prompt="What is the product made by UniFirst?",
        subject="UniFirst",
        target_new="drone",
        target_true="uniform",
        rephrase_prompts=["What does UniFirst make?"],
        locality=[EvalPrompt("nq question: who sings hey jude", "The Beatles", kind="NQ")],
        case_id=0,
    ),
    "knowedit": EditRequest(
        prompt="The country of Goursez Vreizh is",
        subject="Goursez Vreizh",
        target_new="Franche-Comté",
        target_true="France",
        rephrase_prompts=["Goursez Vreizh belongs to the country"],
        locality=[
            EvalPrompt("The founder of Goursez Vreizh is", ["Jean", "J."], kind="Relation_Specificity"),
            EvalPrompt("The members of Goursez Vreizh, which is not Jean, are", "Paul", kind="Forgetfulness"),
        ],
        portability=[EvalPrompt("The capital of the country of Goursez Vreizh is", "Besançon", kind="Reasoning")],
        case_id=0,
    ),
    "wikibio": EditRequest(
        prompt="This is a Wikipedia passage about rick mahler. Rick Mahler was a pitcher.",
        subject="rick mahler",
        target_new="Mahler was drafted by the Braves.",
        locality=[EvalPrompt("The cause of death of rick mahler is", ["MI"], kind="Relation_Specificity")],
        case_id=0,
    ),
}
RECORDS = {"counterfact": COUNTERFACT, "zsre_mend": ZSRE, "knowedit": KNOWEDIT, "wikibio": WIKIBIO}


@pytest.mark.parametrize("fmt", RECORDS)
def test_synthetic_formats(tmp_path, fmt):
    path = _write_json(tmp_path / f"{fmt}.json", [RECORDS[fmt]])
    assert detect_format(RECORDS[fmt]) == fmt
    assert load_edit_dataset(path) == [EXPECTED[fmt]]
    assert load_edit_dataset(path, format=fmt) == [EXPECTED[fmt]]


@pytest.mark.parametrize("fmt", RECORDS)
def test_jsonl(tmp_path, fmt):
    path = _write_jsonl(tmp_path / "data.jsonl", [RECORDS[fmt], RECORDS[fmt]])
    requests = load_edit_dataset(path)
    assert [r.case_id for r in requests] == ([7, 7] if fmt == "counterfact" else [0, 1])
    assert requests[0] == EXPECTED[fmt]


def test_jsonl_content_under_json_suffix(tmp_path):
    path = _write_jsonl(tmp_path / "data.json", [ZSRE, ZSRE])
    assert len(load_edit_dataset(path)) == 2


def test_hf_knowedit_round_trip(tmp_path):
    requests = list(EXPECTED.values())
    path = _write_jsonl(tmp_path / "edit_requests.jsonl", [r.to_dict() for r in requests])
    assert detect_format(requests[0].to_dict()) == "hf_knowedit"
    assert load_edit_dataset(path) == requests
    assert load_edit_dataset(path, format="hf_knowedit") == requests
    assert load_edit_dataset(tmp_path) == requests  # an artifact folder is read through its edit_requests.jsonl


def test_hf_knowedit_template_prompt(tmp_path):
    record = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}
    path = _write_json(tmp_path / "data.json", [record])
    (request,) = load_edit_dataset(path, format="hf_knowedit")
    assert request.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert request.case_id == 0


# ---------------------------------------------------------------------------------------------------------------
# Forced formats and format errors
# ---------------------------------------------------------------------------------------------------------------


def test_forced_format(tmp_path):
    path = _write_json(tmp_path / "data.json", [COUNTERFACT])
    # CounterFact records have the KnowEdit keys too; forcing KnowEdit ignores the flattened locality keys.
    (request,) = load_edit_dataset(path, format="knowedit")
    assert request.locality == [] and request.rephrase_prompts == ["Danielle Darrieux speaks"]
    assert request.target_true == "French" and request.case_id == 7


def test_unknown_format_name(tmp_path):
    path = _write_json(tmp_path / "data.json", [COUNTERFACT])
    with pytest.raises(DatasetFormatError) as info:
        load_edit_dataset(path, format="rome")
    message = str(info.value)
    assert "'rome'" in message
    for name, keys in DATASET_FORMATS.items():
        assert repr(name) in message and str(list(keys)) in message


def test_unknown_keys(tmp_path):
    path = _write_json(tmp_path / "data.json", [{"question": "Who?", "answer": "Me"}])
    with pytest.raises(DatasetFormatError) as info:
        load_edit_dataset(path)
    message = str(info.value)
    assert "['answer', 'question']" in message  # the keys found
    for name, keys in DATASET_FORMATS.items():  # and the keys each format expects
        assert f"{name!r}: {list(keys)}" in message
    assert isinstance(info.value, EditRequestError) and isinstance(info.value, ValueError)


def test_forced_format_missing_keys(tmp_path):
    path = _write_json(tmp_path / "data.json", [ZSRE])
    with pytest.raises(DatasetFormatError) as info:
        load_edit_dataset(path, format="counterfact")
    missing = [key for key in DATASET_FORMATS["counterfact"] if key not in ZSRE]
    assert f"lacks the key(s) {missing}" in str(info.value)
    assert "'counterfact'" in str(info.value)


def test_partial_format_is_an_error(tmp_path):
    record = {k: v for k, v in ZSRE.items() if k not in ("loc", "loc_ans", "rephrase")}
    with pytest.raises(DatasetFormatError, match=r"'zsre_mend' format but lacks its required key\(s\) \['rephrase', "):
        detect_format(record)
    with pytest.raises(DatasetFormatError, match="Cannot detect the format"):
        load_edit_dataset(_write_json(tmp_path / "data.json", [record]))


def test_later_record_missing_keys(tmp_path):
    path = _write_json(tmp_path / "data.json", [KNOWEDIT, {"subject": "x", "prompt": "x is"}])
    with pytest.raises(DatasetFormatError, match=r"Record 1 .* lacks the key\(s\) \['target_new'\]"):
        load_edit_dataset(path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_edit_dataset(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match="edit_requests.jsonl"):
        load_edit_dataset(tmp_path)
    with pytest.raises(DatasetFormatError, match="holds no record"):
        load_edit_dataset(_write_json(tmp_path / "empty.json", []))
    with pytest.raises(DatasetFormatError, match="holds a JSON dict, expected a list"):
        load_edit_dataset(_write_json(tmp_path / "dict.json", KNOWEDIT))
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
        load_edit_dataset(tmp_path / "broken.json")
    with pytest.raises(DatasetFormatError, match="must be a JSON object"):
        load_edit_dataset(_write_json(tmp_path / "strings.json", ["a", "b"]))


# ---------------------------------------------------------------------------------------------------------------
# n and offset
# ---------------------------------------------------------------------------------------------------------------


def _numbered(count):
    return [{**COUNTERFACT, "case_id": i, "target_new": f"Language {i}"} for i in range(count)]


def test_n_and_offset(tmp_path):
    path = _write_json(tmp_path / "data.json", _numbered(6))
    assert [r.case_id for r in load_edit_dataset(path)] == list(range(6))
    assert [r.case_id for r in load_edit_dataset(path, n=2)] == [0, 1]
    assert [r.case_id for r in load_edit_dataset(path, n=2, offset=3)] == [3, 4]
    assert [r.case_id for r in load_edit_dataset(path, offset=4)] == [4, 5]
    assert [r.case_id for r in load_edit_dataset(path, n=6)] == list(range(6))


def test_offset_counts_valid_requests(tmp_path):
    records = _numbered(5)
    records[1]["target_new"] = ""  # skipped: n and offset count the requests left
    path = _write_json(tmp_path / "data.json", records)
    assert [r.case_id for r in load_edit_dataset(path, n=2, offset=1)] == [2, 3]


def test_n_too_large(tmp_path):
    path = _write_json(tmp_path / "data.json", _numbered(3))
    with pytest.raises(DatasetSelectionError) as info:
        load_edit_dataset(path, n=3, offset=1)
    message = str(info.value)
    assert "n=3" in message and "offset=1" in message and "only 3 valid" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(DatasetSelectionError, match="offset=3"):
        load_edit_dataset(path, offset=3)


@pytest.mark.parametrize("n, offset", [(0, 0), (-1, 0), (2.0, 0), (None, -1), (True, 0)])
def test_bad_selection(tmp_path, n, offset):
    with pytest.raises(DatasetSelectionError):
        load_edit_dataset(tmp_path / "never-read.json", n=n, offset=offset)


# ---------------------------------------------------------------------------------------------------------------
# Records whose subject is not in the prompt, and other quirks
# ---------------------------------------------------------------------------------------------------------------


def test_subject_case_insensitive(tmp_path, caplog):
    records = [
        {**WIKIBIO, "text": "Rick Mahler was a pitcher."},
        {**KNOWEDIT, "subject": "goursez vreizh"},
    ]
    path = _write_json(tmp_path / "data.json", records[:1])
    with caplog.at_level(logging.INFO, logger="hf_knowedit"):
        (request,) = load_edit_dataset(path)
    assert request.subject == "Rick Mahler" and request.subject_span == (0, 11)
    assert "In 1 record(s)" in caplog.text
    (request,) = load_edit_dataset(_write_json(tmp_path / "knowedit.json", records[1:]))
    assert request.subject == "Goursez Vreizh"


def test_subject_absent_is_skipped(tmp_path, caplog):
    records = [WIKIBIO, {**WIKIBIO, "concept": "someone else"}, WIKIBIO]
    path = _write_json(tmp_path / "data.json", records)
    with caplog.at_level(logging.WARNING, logger="hf_knowedit"):
        requests = load_edit_dataset(path)
    assert [r.case_id for r in requests] == [0, 2]
    assert "Skipped 1 of the 3 record(s)" in caplog.text and "record 1:" in caplog.text
    assert "'someone else' does not occur in the prompt" in caplog.text
    with pytest.raises(DatasetFormatError, match="Record 1 .*someone else"):
        load_edit_dataset(path, skip_invalid=False)


def test_all_records_invalid(tmp_path):
    path = _write_json(tmp_path / "data.json", [{**ZSRE, "alt": ""}])
    with pytest.raises(DatasetFormatError, match="None of the 1 record"):
        load_edit_dataset(path)


def test_probe_quirks(tmp_path, caplog):
    record = {
        **KNOWEDIT,
        "ground_truth": [[], ["France"], ["France", "FR"]],
        "locality": {
            "Relation_Specificity": [
                {"prompt": "The founder of Goursez Vreizh is", "ground_truth": [[], []]},
                {"prompt": "", "ground_truth": "x"},
                {"prompt": "The head of Goursez Vreizh is", "ground_truth": [["A", "B"], [], ["A"]]},
            ],
            "Forgetfulness": [],
        },
        "portability": {"Reasoning": [{"prompt": "The capital of it is", "ground_truth": [[]]}]},
    }
    path = _write_json(tmp_path / "data.json", [record])
    with caplog.at_level(logging.INFO, logger="hf_knowedit"):
        (request,) = load_edit_dataset(path)
    assert request.target_true == "France"
    assert request.locality == [
        EvalPrompt("The founder of Goursez Vreizh is", None, kind="Relation_Specificity"),
        EvalPrompt("The head of Goursez Vreizh is", ["A", "B"], kind="Relation_Specificity"),
    ]
    assert request.portability == []
    assert "locality without prompt" in caplog.text and "portability without answer" in caplog.text


def test_parallel_probe_lists(tmp_path):
    record = {**WIKIBIO, "locality": {"Relation_Specificity": {"prompt": ["p1", "p2"], "ground_truth": ["a", "b"]}}}
    (request,) = load_edit_dataset(_write_json(tmp_path / "data.json", [record]))
    assert request.locality == [
        EvalPrompt("p1", "a", "Relation_Specificity"),
        EvalPrompt("p2", "b", "Relation_Specificity"),
    ]


def test_detect_format_rejects_non_mapping():
    with pytest.raises(DatasetFormatError, match="must be a JSON object"):
        detect_format(["prompt", "subject"])
