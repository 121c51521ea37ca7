"""Load knowledge-editing datasets into lists of `EditRequest`.

Reads the formats that editing papers publish their data in, and the library's own format (`DATASET_FORMATS`):

- `"counterfact"`: EasyEdit's flattened CounterFact (`counterfact-edit.json`, `counterfact-train.json`), keys
  `case_id, prompt, target_new, subject, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth`.
- `"zsre_mend"`: MEND's and ROME's zsRE (`zsre_mend_train.json`, `zsre_mem_eval.json`), keys
  `subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond`.
- `"knowedit"`: KnowEdit (ZsRE, WikiData_counterfact, WikiData_recent), keys `subject, prompt, target_new,
  ground_truth, rephrase_prompt, locality{Category: [{prompt, ground_truth}]}, portability{...}`.
- `"wikibio"`: KnowEdit's WikiBio (hallucination correction), keys `text, labels, concept, locality{...}`.
- `"hf_knowedit"`: the output of `EditRequest.to_dict()`, e.g. an edit artifact's `edit_requests.jsonl`.

Files are a JSON list of records, or JSON Lines (one record per line, `.jsonl`).
"""

import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import EditConfigError, EditRequestError, KnowEditError
from .requests import SUBJECT_PLACEHOLDER, EditRequest, EvalPrompt, _flatten
from .utils import get_logger


logger = get_logger(__name__)


class DatasetFormatError(EditRequestError):
    """A dataset file is not in a format hf-knowedit reads, or lacks keys that its format requires."""


class DatasetSelectionError(KnowEditError, ValueError):
    """`n` and `offset` ask for more records than a dataset holds, or are out of range."""


DATASET_FORMATS: dict[str, tuple[str, ...]] = {
    "counterfact": (
        "prompt",
        "subject",
        "target_new",
        "ground_truth",
        "rephrase_prompt",
        "locality_prompt",
        "locality_ground_truth",
    ),
    "zsre_mend": ("subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans"),
    "knowedit": ("subject", "prompt", "target_new"),
    "wikibio": ("text", "labels", "concept"),
    "hf_knowedit": ("prompt", "subject", "target_new"),
}
"""Each format's name and the keys every record of that format must have (other keys are optional or ignored)."""

# Keys whose presence marks a record as belonging to a format, in the order formats are tried. A record that carries
# a format's markers but lacks some of its required keys is an error rather than a silent fallback to `knowedit`.
_FORMAT_MARKERS: dict[str, tuple[str, ...]] = {
    "counterfact": ("locality_prompt", "locality_ground_truth"),
    "zsre_mend": ("src", "alt", "loc", "loc_ans"),
    "wikibio": ("text", "labels", "concept"),
    "hf_knowedit": ("target_true", "rephrase_prompts"),
    "knowedit": (),
}

# The name an artifact folder gives to its edit requests; a folder passed to `load_edit_dataset` is read through it.
EDIT_REQUESTS_FILENAME = "edit_requests.jsonl"

_MAX_EXAMPLES_LOGGED = 5


def _expected_keys_text() -> str:
    return "; ".join(f"{name!r}: {list(keys)}" for name, keys in DATASET_FORMATS.items())


def detect_format(record: Mapping[str, Any]) -> str:
    """Return the name of the dataset format that `record` (one record of a file) belongs to.

    Formats are recognised by their distinctive keys (`locality_prompt` for CounterFact, `src`/`alt`/`loc` for zsRE,
    `text`/`labels`/`concept` for WikiBio, `target_true`/`rephrase_prompts` for hf-knowedit's own format); a record
    with `subject`, `prompt` and `target_new` and none of those is read as KnowEdit.

    Args:
        record (`Mapping[str, Any]`):
            One record of the dataset, usually the first.

    Returns:
        `str`: one of the keys of `DATASET_FORMATS`.

    Raises:
        `DatasetFormatError`: if the record is not a mapping, fits no format, or has the markers of a format but lacks
            some of the keys that format requires. The message lists the keys found and the keys each format expects.

    Example:

    ```python
    >>> from hf_knowedit.data import detect_format
    >>> detect_format({"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "drone",
    ...                "answers": ["uniform"], "rephrase": "What does UniFirst make?", "loc": "nq question: x",
    ...                "loc_ans": "y"})
    'zsre_mend'

    ```
    """
    if not isinstance(record, Mapping):
        raise DatasetFormatError(
            f"A dataset record must be a JSON object (a dict), got {type(record).__name__}: {record!r:.200}. Give a "
            "JSON list of objects, or JSON Lines with one object per line."
        )
    keys = set(record)
    for name, markers in _FORMAT_MARKERS.items():
        if markers and not keys.intersection(markers):
            continue
        missing = [key for key in DATASET_FORMATS[name] if key not in keys]
        if not missing:
            return name
        if markers:
            raise DatasetFormatError(
                f"The record has the key(s) {sorted(keys.intersection(markers))} of the {name!r} format but lacks its "
                f"required key(s) {missing}. Keys found: {sorted(keys)}. Every {name!r} record needs "
                f"{list(DATASET_FORMATS[name])}. Add the missing keys, or pass format= one of "
                f"{list(DATASET_FORMATS)} if the file is in another format."
            )
    raise DatasetFormatError(
        f"The record's keys {sorted(keys)} fit no known dataset format. Expected keys per format: "
        f"{_expected_keys_text()}. Rename the keys to one of these formats, or build the `EditRequest` objects "
        "yourself."
    )


def load_edit_dataset(
    path: str | os.PathLike,
    format: str = "auto",
    n: int | None = None,
    offset: int = 0,
    *,
    skip_invalid: bool = True,
) -> list[EditRequest]:
    """Read a knowledge-editing dataset file into a list of `EditRequest`.

    How each format maps to `EditRequest`:

    - `"counterfact"`: `prompt`, `subject`, `target_new`, `target_true=ground_truth`,
      `rephrase_prompts=[rephrase_prompt]`, `locality=[EvalPrompt(locality_prompt, locality_ground_truth,
      kind="Neighborhood")]`, `case_id`.
    - `"zsre_mend"`: `prompt=src`, `target_new=alt`, `target_true=answers[0]`, `rephrase_prompts=[rephrase]`,
      `locality=[EvalPrompt(loc, loc_ans, kind="NQ")]` (ROME's `"nq question: "` prefix is kept as is).
    - `"knowedit"`: `prompt`, `subject`, `target_new`, `target_true` = the first answer of `ground_truth`,
      `rephrase_prompts` from `rephrase_prompt`; `locality` and `portability` from their `{Category: [{prompt,
      ground_truth}]}` dicts, the category kept in `EvalPrompt.kind`. A category may also hold a single
      `{prompt, ground_truth}` dict, or parallel lists of prompts and answers. Answers given as strings, lists or
      nested lists of aliases become one flat list of aliases, duplicates removed, in order.
    - `"wikibio"`: `prompt=text`, `subject=concept`, `target_new=labels`, locality as for KnowEdit.
    - `"hf_knowedit"`: `EditRequest.from_dict` of each record.

    Records without a `case_id` get their 0-based position in the file as `case_id`.

    Records that cannot make a valid request are skipped with one logged warning per file that gives their count,
    positions and reasons (with `skip_invalid=False` the first one raises instead):

    - the subject does not occur in the prompt. A case-insensitive match is not an error: the subject is then taken
      in the prompt's spelling (`"john smith"` in `"John Smith was born in"` becomes `"John Smith"`), logged at INFO
      level with the count of such records;
    - an empty prompt, subject or new target (e.g. 2 of the 1,000 records of `zsre_mend_train-1k.json` have
      `alt == ""`).

    Probes (locality, portability) with an empty prompt are dropped, as are portability probes without an answer; a
    locality probe without an answer is kept with `answer=None` (only "unchanged by the edit" can be measured). The
    counts are logged at INFO level.

    Args:
        path (`str` or `os.PathLike`):
            A `.json` file holding a list of records, a `.jsonl` file with one record per line, or an edit artifact's
            folder (its `edit_requests.jsonl` is read).
        format (`str`, *optional*, defaults to `"auto"`):
            `"auto"` detects the format from the keys of the first record (see `detect_format`); otherwise one of
            `DATASET_FORMATS`: `"counterfact"`, `"zsre_mend"`, `"knowedit"`, `"wikibio"`, `"hf_knowedit"`.
        n (`int`, *optional*, defaults to `None`):
            How many requests to return; all of them when `None`.
        offset (`int`, *optional*, defaults to `0`):
            How many valid requests to pass over before the first one returned. `n` and `offset` count the requests
            after invalid records are skipped. With `n` set, reading stops once `offset + n` requests are found.
        skip_invalid (`bool`, *optional*, defaults to `True`):
            Skip records that make no valid request (logged), or raise `DatasetFormatError` at the first one.

    Returns:
        `list[EditRequest]`: the requests, in file order.

    Raises:
        `FileNotFoundError`: if `path` does not exist.
        `DatasetFormatError`: if the format is unknown, the file fits no format, a record lacks a key its format
            requires, or the file holds no record.
        `DatasetSelectionError`: if `n` or `offset` is negative or not an integer, or the file holds fewer than
            `offset + n` valid requests.

    Example:

    ```python
    >>> from hf_knowedit.data import load_edit_dataset
    >>> requests = load_edit_dataset("../shared/data/counterfact_easyedit/counterfact-edit.json", n=2)  # doctest: +SKIP
    >>> requests[0].prompt, requests[0].target_new  # doctest: +SKIP
    ('The mother tongue of Danielle Darrieux is', 'English')

    ```
    """
    if format != "auto" and format not in DATASET_FORMATS:
        raise DatasetFormatError(
            f"Unknown dataset format {format!r}. Use 'auto' or one of {list(DATASET_FORMATS)}; their required keys "
            f"are {_expected_keys_text()}."
        )
    _check_selection(n, offset)
    path = _resolve_path(path)
    records = _read_records(path)
    first = next(records, None)
    if first is None:
        raise DatasetFormatError(
            f"The dataset file {str(path)!r} holds no record. Give a file with at least one record."
        )
    if format == "auto":
        try:
            format = detect_format(first)
        except DatasetFormatError as error:
            raise DatasetFormatError(f"Cannot detect the format of {str(path)!r}: {error}") from None
        logger.debug("Detected format %r for %s", format, path)

    convert = _CONVERTERS[format]
    stats = _LoadStats()
    wanted = None if n is None else offset + n
    requests: list[EditRequest] = []
    position = 0
    for position, record in enumerate(_chain(first, records)):
        _check_required_keys(record, format, position, path)
        try:
            request = convert(record, position, stats)
        except EditRequestError as error:
            if not skip_invalid:
                raise DatasetFormatError(
                    f"Record {position} of {str(path)!r} (format {format!r}) makes no valid edit request: {error} "
                    "Fix or remove the record, or pass skip_invalid=True to skip such records."
                ) from None
            stats.skipped.append((position, str(error)))
            continue
        requests.append(request)
        if wanted is not None and len(requests) >= wanted:
            break
    stats.log(path, format, records_read=position + 1)

    available = len(requests)
    if available == 0:
        raise DatasetFormatError(
            f"None of the {position + 1} record(s) of {str(path)!r} (format {format!r}) makes a valid edit request; "
            f"the first reasons: {[reason for _, reason in stats.skipped[:_MAX_EXAMPLES_LOGGED]]}. Check that the "
            "file is in the format given."
        )
    if (wanted is not None and available < wanted) or offset >= available:
        raise DatasetSelectionError(
            f"Asked for n={n} request(s) after offset={offset}, but {str(path)!r} holds only {available} valid "
            f"request(s) ({len(stats.skipped)} of its {position + 1} record(s) skipped as invalid). Lower n or offset"
            f"{', or pass n=None to take all the requests after offset' if n is not None else ''}."
        )
    return requests[offset:wanted]


def load_config_records(path: str | os.PathLike, max_records: int, field: str) -> list[EditRequest]:
    """The first `max_records` records of an edit dataset file that a config field names (IKE's demonstrations, a
    T-Patcher memory set); an `EditConfigError` naming `field` when the file is missing or unreadable."""
    if not Path(path).expanduser().is_file():
        raise EditConfigError(f"{field} {str(path)!r} does not exist; give an edit dataset file.")
    try:
        return load_edit_dataset(Path(path).expanduser())[:max_records]
    except KnowEditError as error:
        raise EditConfigError(f"{field} {str(path)!r} cannot be read as an edit dataset: {error}") from error


class _LoadStats:
    """What was changed or dropped while loading one file, to report it in a few log lines."""

    def __init__(self):
        self.skipped: list[tuple[int, str]] = []
        self.subject_respelled: list[int] = []
        self.probes_dropped: Counter = Counter()

    def log(self, path: Path, format: str, records_read: int) -> None:
        if self.skipped:
            examples = "; ".join(f"record {i}: {reason}" for i, reason in self.skipped[:_MAX_EXAMPLES_LOGGED])
            logger.warning(
                "Skipped %d of the %d record(s) read from %s (format %r) that make no valid edit request: %s%s",
                len(self.skipped),
                records_read,
                path,
                format,
                examples,
                " ..." if len(self.skipped) > _MAX_EXAMPLES_LOGGED else "",
            )
        if self.subject_respelled:
            logger.info(
                "In %d record(s) of %s the subject occurs in the prompt only with another capitalisation; the "
                "prompt's spelling is used (records %s%s).",
                len(self.subject_respelled),
                path,
                self.subject_respelled[:_MAX_EXAMPLES_LOGGED],
                " ..." if len(self.subject_respelled) > _MAX_EXAMPLES_LOGGED else "",
            )
        if self.probes_dropped:
            logger.info("Dropped evaluation probes while reading %s: %s", path, dict(self.probes_dropped))


def _check_selection(n: int | None, offset: int) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DatasetSelectionError(f"n must be a positive integer or None (all records), got {n!r}.")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise DatasetSelectionError(f"offset must be a non-negative integer, got {offset!r}.")


def _resolve_path(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        inner = path / EDIT_REQUESTS_FILENAME
        if not inner.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is a folder without an {EDIT_REQUESTS_FILENAME!r} file. Give the path of a .json or "
                ".jsonl dataset file, or of an edit artifact's folder."
            )
        return inner
    if not path.is_file():
        raise FileNotFoundError(
            f"No dataset file at {str(path)!r}. Check the path (it is resolved from {os.getcwd()!r})."
        )
    return path


def _read_records(path: Path) -> Iterator[Any]:
    """Yield the records of a JSON list or JSON Lines file, streaming JSON Lines."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values: JSON Lines under another suffix
            return _read_jsonl(path)
        raise DatasetFormatError(
            f"{str(path)!r} is not valid JSON ({error}). Give a JSON list of records, or JSON Lines with one record "
            "per line in a .jsonl file."
        ) from None
    if not isinstance(data, list):
        raise DatasetFormatError(
            f"{str(path)!r} holds a JSON {type(data).__name__}, expected a list of records. Wrap the records in a "
            "list, or write one record per line in a .jsonl file."
        )
    return iter(data)


def _read_jsonl(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(
                    f"Line {line_number} of {str(path)!r} is not valid JSON ({error}). A JSON Lines file holds one "
                    "JSON object per line."
                ) from None


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _check_required_keys(record: Any, format: str, position: int, path: Path) -> None:
    if not isinstance(record, Mapping):
        raise DatasetFormatError(
            f"Record {position} of {str(path)!r} is a {type(record).__name__}, expected a JSON object with the keys "
            f"{list(DATASET_FORMATS[format])}."
        )
    missing = [key for key in DATASET_FORMATS[format] if key not in record]
    if missing:
        raise DatasetFormatError(
            f"Record {position} of {str(path)!r} lacks the key(s) {missing} required by the {format!r} format. Keys "
            f"found: {sorted(record)}. Expected keys per format: {_expected_keys_text()}. Pass the format the file is "
            "in, or format='auto' to detect it."
        )


def _answers(value: Any) -> str | list[str] | None:
    """A string answer as is; a list (possibly nested) of aliases flattened, blanks and duplicates removed."""
    if isinstance(value, (list, tuple)):
        aliases = [str(a) for a in _flatten(value) if str(a).strip()]
        return list(dict.fromkeys(aliases)) or None
    if value is None or not str(value).strip():
        return None
    return str(value)


def _first_answer(value: Any) -> str | None:
    answers = _answers(value)
    return answers[0] if isinstance(answers, list) else answers


def _probes(value: Any, stats: _LoadStats, role: str, kind: str = "") -> list[EvalPrompt]:
    """Evaluation probes from `{Category: [{prompt, ground_truth}]}`, a list of probes, or a single probe."""
    if value is None:
        return []
    if isinstance(value, str):
        value = {"prompt": value}
    if isinstance(value, (list, tuple)):
        return [probe for item in value for probe in _probes(item, stats, role, kind)]
    if not isinstance(value, Mapping):
        raise EditRequestError(
            f"A {role} probe must be a dict with 'prompt' and 'ground_truth', a list of them, or a dict of categories "
            f"to such lists; got {type(value).__name__}: {value!r:.200}."
        )
    if "prompt" not in value:  # a dict of categories
        return [probe for category, items in value.items() for probe in _probes(items, stats, role, str(category))]
    prompt = value["prompt"]
    answer = value.get("ground_truth", value.get("answer", value.get("target")))
    kind = str(value.get("kind") or kind)
    if isinstance(prompt, (list, tuple)):  # parallel lists of prompts and answers
        answers = answer if isinstance(answer, (list, tuple)) and len(answer) == len(prompt) else [answer] * len(prompt)
        return [
            probe
            for p, a in zip(prompt, answers)
            for probe in _probes({"prompt": p, "ground_truth": a, "kind": kind}, stats, role, kind)
        ]
    if not isinstance(prompt, str) or not prompt.strip():
        stats.probes_dropped[f"{role} without prompt"] += 1
        return []
    answer = _answers(answer)
    if answer is None and role == "portability":
        stats.probes_dropped["portability without answer"] += 1
        return []
    return [EvalPrompt(prompt=prompt, answer=answer, kind=kind)]


def _match_subject(prompt: Any, subject: Any, position: int, stats: _LoadStats) -> Any:
    """The subject as spelled in the prompt; EditRequest reports what is wrong with either if they are not strings."""
    if not isinstance(prompt, str) or not isinstance(subject, str):
        return subject
    subject = subject.strip()
    if not subject or SUBJECT_PLACEHOLDER in prompt or subject in prompt:
        return subject
    matches = list(re.finditer(re.escape(subject), prompt, flags=re.IGNORECASE))
    if matches:
        stats.subject_respelled.append(position)
        return matches[-1].group(0)
    return subject  # EditRequest raises, and the record is skipped or reported


def _case_id(record: Mapping[str, Any], position: int) -> str | int:
    case_id = record.get("case_id")
    return position if case_id is None else case_id


def _from_counterfact(record: Mapping[str, Any], position: int, stats: _LoadStats) -> EditRequest:
    return EditRequest(
        prompt=record["prompt"],
        subject=_match_subject(record["prompt"], record["subject"], position, stats),
        target_new=record["target_new"],
        target_true=_first_answer(record["ground_truth"]),
        rephrase_prompts=_as_list(record["rephrase_prompt"]),
        locality=_probes(
            {"prompt": record["locality_prompt"], "ground_truth": record["locality_ground_truth"]},
            stats,
            "locality",
            "Neighborhood",
        ),
        case_id=_case_id(record, position),
    )


def _from_zsre_mend(record: Mapping[str, Any], position: int, stats: _LoadStats) -> EditRequest:
    return EditRequest(
        prompt=record["src"],
        subject=_match_subject(record["src"], record["subject"], position, stats),
        target_new=record["alt"],
        target_true=_first_answer(record["answers"]),
        rephrase_prompts=_as_list(record["rephrase"]),
        locality=_probes({"prompt": record["loc"], "ground_truth": record["loc_ans"]}, stats, "locality", "NQ"),
        case_id=_case_id(record, position),
    )


def _from_knowedit(record: Mapping[str, Any], position: int, stats: _LoadStats) -> EditRequest:
    return EditRequest(
        prompt=record["prompt"],
        subject=_match_subject(record["prompt"], record["subject"], position, stats),
        target_new=record["target_new"],
        target_true=_first_answer(record.get("ground_truth")),
        rephrase_prompts=_as_list(record.get("rephrase_prompt")),
        locality=_probes(record.get("locality"), stats, "locality"),
        portability=_probes(record.get("portability"), stats, "portability"),
        case_id=_case_id(record, position),
    )


def _from_wikibio(record: Mapping[str, Any], position: int, stats: _LoadStats) -> EditRequest:
    return EditRequest(
        prompt=record["text"],
        subject=_match_subject(record["text"], record["concept"], position, stats),
        target_new=record["labels"],
        locality=_probes(record.get("locality"), stats, "locality"),
        case_id=_case_id(record, position),
    )


def _from_hf_knowedit(record: Mapping[str, Any], position: int, stats: _LoadStats) -> EditRequest:
    record = dict(record)
    record["subject"] = _match_subject(record["prompt"], record["subject"], position, stats)
    if record.get("case_id") is None:
        record["case_id"] = position
    return EditRequest.from_dict(record)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_CONVERTERS = {
    "counterfact": _from_counterfact,
    "zsre_mend": _from_zsre_mend,
    "knowedit": _from_knowedit,
    "wikibio": _from_wikibio,
    "hf_knowedit": _from_hf_knowedit,
}


__all__ = [
    "DATASET_FORMATS",
    "DatasetFormatError",
    "DatasetSelectionError",
    "detect_format",
    "load_edit_dataset",
]
