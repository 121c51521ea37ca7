"""The evaluation harness: edit a model case by case, in batches or sequentially, and score it before and after.

A run writes into its output directory:

- `settings.json`: what was run (method and config, model, dataset, selection, mode, schedule, protocols, seed), the
  SHA-256 of the dataset file and of each file a config field `*_file` names (IKE's demonstrations, T-Patcher's
  memory), and for a learned method (MEND, KE, SERAC) `editor`: a SHA-256 of its trained editor's weights (by
  content) and its training steps (`hf_knowedit.training.editor_identity`), since the path a config names may hold
  an editor trained again since, and for a method that computes second-moment statistics (ROME, MEMIT, AlphaEdit)
  `statistics_corpus`: the corpus they come from (`hf_knowedit.statistics.corpus_identity`: its path and a SHA-256
  of its files' contents; `None` when the config reads them from `stats_dir`). A later run into the same directory
  must have the same settings, files, editor and corpus (a file or corpus may be named by another path; a run of a
  learned method that edited before runs recorded their editor is refused, as its editor cannot be told; a run that
  edited before runs recorded their corpus goes on with a warning), and then resumes it; `overwrite=True` deletes it
  and starts afresh.
- `pre.jsonl`: one line per case, the untouched model's scores (and the raw locality outputs that "unchanged" compares
  with).
- `results.jsonl`: one line per case: pre and post scores, skipped metrics with reasons, the fluency generations (when
  fluency is scored), seconds, peak memory, and `edit_refused`: `None`, or the message of the `EditFailedError` with
  which the method refused the case's edit (the model is then left as it was, the run goes on, and the case is scored
  without its edit), or why the case was left out of its chunk's edit (it contradicts an earlier case of the chunk,
  which a method that edits a chunk at once cannot satisfy: `ContradictoryRequestsError`), and in `single` and
  `batch` modes `edit_stats`: the figures the method reported for the edit of the case's chunk (its optimisation
  steps and losses, the seconds of its phases; `{}` when the edit was refused).
- `curve.jsonl` (sequential runs with `every:K`): the mean scores of all cases edited so far, every K edits, how
  many of those edits were refused, and their mean seconds per edit (a report shows a stream stopped before its end
  at its last checkpoint, seconds included).
- `summary.json`: means with 95% confidence intervals, skip counts, refused edits, efficiency, versions, the editor.
- `snapshots/at-<N>/` (sequential runs, while they are not complete): the edited state after the last N edits
  snapshotted (see `hf_knowedit.evaluation.snapshots`; `snapshot_every` of `run_evaluation` says when), deleted when
  the stream ends.
- `edit_work/chunk-<N>/` (chunks of more than one case in `single` and `batch` modes, while the chunk is not
  recorded): the per-request work its edit finished (target values, knowledge neurons: `hf_knowedit.resumable`) and,
  in `scores.jsonl`, the records of its parts of `scorer_batch_size` cases scored so far.

Modes:

- `single`: each case edited alone on the untouched model, scored, and the edit removed (the base model is checked to
  be restored).
- `batch`: chunks of `batch_size` cases edited at once, each chunk on the untouched model.
- `sequential`: the chunks (of `batch_size`, 1 by default) edited one after another on the same model, the edits
  accumulating; scored per the schedule: `final` (every case after all edits), `immediate` (each chunk right after its
  edit) or `every:K` (all cases edited so far after every K edits; per-case records hold the final scores).

Resuming: in `single` and `batch` modes the chunks whose cases all have records are skipped, and a chunk stopped
during its edit or its scoring is edited again with the work its edit had finished (a batch of 1,000 MEMIT or KN
edits takes hours on a CPU) and scores only the parts of `scorer_batch_size` cases it had not scored (a chunk of
more cases is always scored in such parts, stopped or not, so that its scores are those of a run that did not stop);
its edit seconds count the reused work's seconds, as if it had not stopped. In
`sequential` mode the model's state is loaded from the latest snapshot that holds no edit whose scores are owed
(with `every:K`, the last checkpoint's; with `immediate`, one at or before the last chunk scored; with `final`,
any): the edit, what the method keeps between calls, and the edits' seconds and refusals. The stream goes on from
there as if it had not stopped; edits scored already that no snapshot holds (a run made before snapshots were
written, a damaged snapshot, the edits after the last snapshot of an `immediate` stream) are recomputed without
being scored again. A `final` stream also snapshots its last edit and records its scores round by round
(`scorer_batch_size` cases per process), so that a run stopped while scoring resumes from that snapshot and scores
only the cases left.

Several processes (`accelerate launch --multi_gpu --num_processes N`, `torchrun --nproc_per_node N`): the harness
joins the process group through accelerate's `PartialState` (NCCL on one GPU per process, gloo on CPU-only machines)
and splits the work; the output is that of a one-process run, written by the main process only (per-case scores are
equal; seconds and memory are those of the process that did the work, named by each record's `rank`; `summary.json`
records `world_size`).

- Pre-edit scores: the chunks of `scorer_batch_size` cases are dealt round-robin to the processes.
- `single` and `batch`: the chunks are independent and each is seeded by its number, so they are dealt round-robin
  too; after every round of `world_size` chunks the records are gathered and the main process appends them in case
  order. Resuming skips the same finished chunks on every process (the main process reads the files and broadcasts
  them), whatever the number of processes of the interrupted run.
- `sequential`: the edits accumulate in order and cannot be split, so every process applies all of them, with the
  same seeds (the processes hold the same edited model); the scoring of the cases edited so far is dealt out in
  chunks of `scorer_batch_size` cases. The edits take as long as on one process and the scoring is split: use few
  processes for long sequential runs, or none.

Every process must call [`run_evaluation`] (the command line does). A model passed to it stays where it is; one the
harness loads goes to the process's GPU under several processes. A failure while scoring or editing a dealt-out chunk,
or in the main process's reading and writing, raises on every process (an `EvaluationProcessError` on the others)
rather than leaving them waiting; a process that dies otherwise is handled by the launcher, which stops the others.
Progress bars are shown by the main process only.

Chat templates (`chat_template=True`, `--chat-template`): every prompt of every case (edit prompt, paraphrases,
locality and portability probes, and the fluency prompt) is put into the tokenizer's chat template as the user's turn,
followed by the opening of the assistant's turn, which the target continues. The edits are made on the templated
prompts too, since the edit must hold in the form the model is queried in. `summary.json` records the template's
SHA-256 and an example prompt; a tokenizer without a chat template raises `ChatTemplateError`.
"""

import contextlib
import hashlib
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..artifacts import file_sha256
from ..config import build_config, get_editor_class, with_default_fields
from ..data import load_edit_dataset
from ..devices import input_device
from ..distributed import join_process_group, rank_and_world_size
from ..edited_model import EditedModel
from ..errors import ArtifactError, ContradictoryRequestsError, EditFailedError, KnowEditError
from ..metrics import FLUENCY_PROTOCOL, PROTOCOLS
from ..resumable import resumable_edits
from ..scoring import BatchScorer
from ..utils import get_logger, sha256_json, tqdm, write_json
from ..version import __version__
from .probes import METRICS, ChatTemplateError, apply_chat_template, score_cases
from .snapshots import SNAPSHOTS_DIR, delete_snapshots, latest_snapshot, load_snapshot, save_snapshot


logger = get_logger(__name__)

MODES = ("single", "batch", "sequential")
SETTINGS_NAME = "settings.json"
PRE_NAME = "pre.jsonl"
RESULTS_NAME = "results.jsonl"
CURVE_NAME = "curve.jsonl"
SUMMARY_NAME = "summary.json"
EDIT_WORK_NAME = "edit_work"  # the finished per-request work of batch edits not yet scored
EDIT_WORK_SCORES = "scores.jsonl"  # in a chunk's edit work: the records of its parts scored so far
EDIT_NAME = "evaluation"
EDITOR_KEY = "editor"  # in settings.json and summary.json: the identity of a learned method's trained editor
STATS_CORPUS_KEY = "statistics_corpus"  # in settings.json: the corpus of a method's second-moment statistics
CONFIG_FILES_KEY = "config_files_sha256"  # in settings.json: the SHA-256 of each file a config field `*_file` names
# a method config's fields that a run's settings leave out: the method is its own setting, the model another
NOT_COMPARED_CONFIG_FIELDS = ("edit_type", "base_model_name_or_path", "revision")
NORMAL_CLIPPED = "normal, clipped to [0, 1]"
CI_METHOD = ("over cases, 95%: scores that are all 0 or 1, Wilson's score interval (z = 1.96); other scores, the "
             "normal approximation mean ± 1.96 * s / sqrt(n) (s the sample standard deviation, ddof=1) clipped to "
             "[0, 1]; fluency and seconds, the normal approximation. Each entry names its interval.")
RESTORE_TOLERANCE = 1e-4
DEFAULT_SNAPSHOT_EVERY = 100  # edits between snapshots of `immediate` and `final` streams


class EvaluationSettingsError(KnowEditError, ValueError):
    """Evaluation settings are invalid, or differ from those of the run already in the output directory."""


class EvaluationProcessError(KnowEditError, RuntimeError):
    """Another process of a run over several processes failed; its error is named here and shown in its own output."""


def parse_schedule(schedule: str) -> tuple[str, int | None]:
    """`"final"`, `"immediate"` or `"every:K"` (K a positive integer) -> `(kind, K)`."""
    if schedule in ("final", "immediate"):
        return schedule, None
    match = re.fullmatch(r"every:(\d+)", str(schedule))
    if match and int(match.group(1)) > 0:
        return "every", int(match.group(1))
    raise EvaluationSettingsError(
        f"eval_schedule must be 'final', 'immediate' or 'every:K' with K a positive integer, got {schedule!r}."
    )


@dataclass
class EvaluationSettings:
    """What an evaluation run does; stored in `settings.json` and compared when a run resumes.

    Args:
        method (`str`): registered method name (`hf_knowedit.EDIT_METHODS`), e.g. `"ft"`.
        config (`dict`): the method config's fields (`EditConfig.to_dict()`).
        model (`str`): model id or path (`"default"` for the embedded SmolLM2-135M).
        dataset (`str`): a file `load_edit_dataset` reads.
        n (`int`, *optional*): number of cases (`None`: all after `offset`).
        offset (`int`, *optional*, defaults to `0`): index of the first case.
        mode (`str`, *optional*, defaults to `"single"`): `single`, `batch` or `sequential`.
        batch_size (`int`, *optional*, defaults to `1`): cases per edit in `batch` and `sequential` modes.
        eval_schedule (`str`, *optional*, defaults to `"final"`): `final`, `immediate` or `every:K`.
        protocols (`list[str]`, *optional*, defaults to all three): protocols to compute.
        fluency_tokens (`int`, *optional*, defaults to `50`): greedy tokens generated for fluency (0: none).
        seed (`int`, *optional*, defaults to `0`): torch and Python seeds, reset to `seed + chunk` before each edit.
        label (`str`, *optional*): the method's name in reports (default: from the config's variant, e.g. `FT-M`,
            or the method's name in capitals; set when the run starts).
        chat_template (`bool`, *optional*, defaults to `False`): put every prompt into the tokenizer's chat template
            (the user's turn; the target continues the assistant's) for editing and for scoring.
        dtype (`str`, *optional*, defaults to `"float32"`): `float32`, `bfloat16` or `float16`, the dtype the model is
            loaded in when the harness loads it.
        device_map (`str`, *optional*): accelerate device map the harness loads the model with (e.g. `"auto"`); not
            part of the settings a resumed run must share.
        editor_sees_probes (`bool`, *optional*, defaults to `False`): give the editor each case's rephrase, locality
            and portability prompts too. By default it receives only the prompt, subject and targets, so that no
            method (T-Patcher's memory loss, KN's refinement over paraphrases) is fitted to the prompts it is then
            scored on. Runs made before this setting existed gave the probes to the editor and read as `True`.
    """

    method: str
    config: dict
    model: str
    dataset: str
    n: int | None = None
    offset: int = 0
    mode: str = "single"
    batch_size: int = 1
    eval_schedule: str = "final"
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    fluency_tokens: int = 50
    seed: int = 0
    label: str | None = None
    chat_template: bool = False
    dtype: str = "float32"
    device_map: str | None = None
    editor_sees_probes: bool = False

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise EvaluationSettingsError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.mode not in MODES:
            raise EvaluationSettingsError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise EvaluationSettingsError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.mode == "single" and self.batch_size != 1:
            raise EvaluationSettingsError(
                f"mode 'single' edits one case at a time; got batch_size={self.batch_size}. Use mode 'batch'."
            )
        kind, _ = parse_schedule(self.eval_schedule)
        if kind == "every" and self.mode != "sequential":
            raise EvaluationSettingsError(
                f"eval_schedule {self.eval_schedule!r} needs mode 'sequential'; in mode {self.mode!r} every chunk is "
                "scored on its own edit ('final' or 'immediate')."
            )
        self.protocols = list(self.protocols)
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise EvaluationSettingsError(
                f"protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols}."
            )
        if not isinstance(self.fluency_tokens, int) or self.fluency_tokens < 0:
            raise EvaluationSettingsError(
                f"fluency_tokens must be a non-negative integer, got {self.fluency_tokens!r}."
            )
        for name in ("chat_template", "editor_sees_probes"):
            if not isinstance(getattr(self, name), bool):
                raise EvaluationSettingsError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    def comparable(self) -> dict:
        """The settings a resumed run must share; `n` may grow in `single`/`batch` modes (cases are independent)."""
        data = asdict(self)
        data.pop("label")
        data.pop("device_map")  # where the layers sit does not change what is computed
        if self.mode != "sequential":
            data.pop("n")
        return data


# Names as the methods' papers write them; every other method (ROME, MEMIT, KN, ...) is its name in capitals.
METHOD_LABELS = {"tpatcher": "T-Patcher", "calinet": "CaliNET", "alphaedit": "AlphaEdit"}


def _in_capitals(name: str) -> str:
    return name.upper().replace("_", "-")


def default_label(method: str, config: dict) -> str:
    """The method's name in reports: its variant (`ft_m` -> `FT-M`), its paper's spelling (`tpatcher` -> `T-Patcher`)
    or its name in capitals (`rome` -> `ROME`)."""
    variant = config.get("variant") if isinstance(config, dict) else None
    name = variant or method
    return METHOD_LABELS.get(name, _in_capitals(name))


def report_label(summary: dict) -> str:
    """The label a report shows for a run: its own, except that runs labelled by an earlier default (the name in
    capitals, e.g. `TPATCHER`) get today's default (`T-Patcher`)."""
    label, method = summary["method_label"], summary.get("method", "")
    if method in METHOD_LABELS and label == _in_capitals(method):
        return METHOD_LABELS[method]
    return label


# -- memory and versions -------------------------------------------------------------------------------------------
def peak_memory() -> dict:
    """Peak resident memory of this process (bytes, from `getrusage`) and, on GPU, peak allocated CUDA memory."""
    usage = {"rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        usage["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return usage


def environment_info(model) -> dict:
    import transformers

    config = getattr(model, "config", None)
    return {
        "hf_knowedit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(input_device(model)),
        "torch_threads": torch.get_num_threads(),
        "model_name_or_path": getattr(config, "_name_or_path", None),
        "model_type": getattr(config, "model_type", None),
        "model_dtype": str(next(model.parameters()).dtype),
        "model_parameters": sum(p.numel() for p in model.parameters()),
    }


# -- JSONL ---------------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a last line cut short by an interruption is dropped."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                logger.warning("Dropping the truncated last line of %s", path)
                break
            raise EvaluationSettingsError(f"{path} line {number + 1} is not valid JSON; delete the file or use "
                                          "overwrite.") from None
    return records


def append_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    """Rewrite a JSONL file (drops a cut-off last line before appending)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records),
                   encoding="utf-8")
    tmp.replace(path)


# -- processes -----------------------------------------------------------------------------------------------------
class _Processes:
    """The processes of a run (one, or those of torch.distributed) and the few collectives the harness needs.

    With one process every collective is the identity. The work done inside :meth:`rounds` and :meth:`on_main` shares
    each process's failure with the others before raising, so that no process is left waiting for a failed one.
    """

    def __init__(self):
        join_process_group()
        self.rank, self.world_size = rank_and_world_size()
        self.is_main = self.rank == 0

    def progress_bar(self, **kwargs):
        return tqdm(**kwargs) if self.is_main else tqdm(disable=True, **kwargs)

    def _all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def _raise_failures(self, failures: list[tuple[int, str]], own: BaseException | None) -> None:
        if own is not None:
            raise own
        if failures:
            rank, failure = failures[0]
            raise EvaluationProcessError(
                f"Process {rank} of {self.world_size} failed ({failure}), so this process stopped too; the full error "
                "is in that process's output."
            )

    def rounds(self, items: list, fn):
        """Apply `fn` to `items`, item `i` on process `i % world_size`; yield `(round_items, results)` per round of
        `world_size` items, on every process, the results in the order of `round_items`."""
        for start in range(0, len(items), self.world_size):
            batch = items[start : start + self.world_size]
            result, own, failure = None, None, None
            if self.rank < len(batch):
                try:
                    result = fn(batch[self.rank])
                except Exception as error:
                    own, failure = error, f"{type(error).__name__}: {error}"
            gathered = self._all_gather((result, failure))
            self._raise_failures([(rank, f) for rank, (_, f) in enumerate(gathered) if f is not None], own)
            yield batch, [r for r, _ in gathered[: len(batch)]]

    def on_main(self, fn):
        """`fn()` run by the main process only; its result is returned (its error raised) on every process."""
        result, own, failure = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as error:
                own, failure = error, f"{type(error).__name__}: {error}"
        if self.world_size > 1:
            import torch.distributed as dist

            box = [(result, failure)]
            dist.broadcast_object_list(box, src=0)
            result, failure = box[0]
        self._raise_failures([(0, failure)] if failure is not None else [], own)
        return result


# -- the run -------------------------------------------------------------------------------------------------------
def _file_sha256(path) -> str | None:
    """The SHA-256 of a file's bytes, or `None` when it cannot be read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _editor_identity(config: dict) -> dict | None:
    """The identity (weights' SHA-256, training steps) of the trained editor a learned method's config names, or
    `None` for methods without one, the untrained network, or an editor that cannot be found (the method says what
    is missing when it loads it)."""
    from ..training import UNTRAINED, editor_identity

    source = config.get("editor")
    if not isinstance(source, str) or source == UNTRAINED:
        return None
    try:
        return editor_identity(source)
    except ArtifactError:
        return None


def _statistics_corpus(config: dict) -> dict | None:
    """The identity of the corpus a locate-then-edit config computes its second-moment statistics from (see
    :func:`hf_knowedit.statistics.corpus_identity`), or `None` for other methods, statistics read from `stats_dir`,
    or a corpus that cannot be found (the method says what is missing when it needs it)."""
    from ..errors import CorpusNotFoundError
    from ..statistics import corpus_identity

    if "stats_corpus" not in config or config.get("stats_dir") is not None:
        return None
    try:
        return corpus_identity(config["stats_corpus"])
    except CorpusNotFoundError:
        return None


def _describe_corpus(corpus: dict) -> str:
    fingerprint = corpus.get("fingerprint")
    named = f"SHA-256 {fingerprint[:12]}..." if fingerprint else "by name"
    return f"{corpus.get('path') or corpus.get('source')!r} ({named})"


def _prepare_output(output_dir: Path, settings: EvaluationSettings, overwrite: bool) -> dict | None:
    """Check a run already in `output_dir` against `settings` (or delete it, with `overwrite`), write
    `settings.json`, and return the identity of the trained editor the run uses (see :func:`_editor_identity`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / SETTINGS_NAME
    dataset_sha256 = _file_sha256(settings.dataset)
    editor = _editor_identity(settings.config)
    corpus = _statistics_corpus(settings.config)
    config_files = {name: _file_sha256(value) for name, value in settings.config.items()
                    if name.endswith("_file") and isinstance(value, str)}
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        stored.pop("hf_knowedit_version", None)
        stored_sha256 = stored.pop("dataset_sha256", None)
        stored_files = stored.pop(CONFIG_FILES_KEY, None) or {}
        recorded = EDITOR_KEY in stored  # runs made before runs recorded their editor lack the key
        stored_editor = stored.pop(EDITOR_KEY, None)
        corpus_recorded = STATS_CORPUS_KEY in stored
        stored_corpus = stored.pop(STATS_CORPUS_KEY, None)
        stored.setdefault("editor_sees_probes", True)  # runs made before the setting gave the editor every probe
        stored["config"] = with_default_fields(stored.get("method"), stored.get("config"), NOT_COMPARED_CONFIG_FIELDS)
        try:
            previous = EvaluationSettings(**stored).comparable()
        except (TypeError, EvaluationSettingsError):
            previous = stored
        current = settings.comparable()
        changed_files = [_reconcile_file("dataset", previous, current, "dataset", stored_sha256, dataset_sha256)]
        previous_config = previous.get("config") if isinstance(previous.get("config"), dict) else {}
        changed_files += [_reconcile_file(f"config.{name}", previous_config, current["config"], name,
                                          stored_files.get(name), digest) for name, digest in config_files.items()]
        if (stored_corpus and corpus and stored_corpus.get("fingerprint") == corpus.get("fingerprint")
                and corpus.get("fingerprint") is not None):
            previous_config["stats_corpus"] = current["config"].get("stats_corpus")  # the same texts elsewhere
        differing = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        shown = asdict(settings)  # a setting compared in one mode only (`n`) shows its value in both
        pairs = {k: (previous.get(k, stored.get(k)), current.get(k, shown.get(k))) for k in differing}
        details = [_differences(k, there, now) for k, (there, now) in pairs.items() if there != now]
        details += [change for change in changed_files if change]
        if stored_editor and editor and stored_editor.get("sha256") != editor["sha256"]:
            details.append(f"the trained editor {settings.config['editor']!r}: weights with SHA-256 "
                           f"{str(stored_editor.get('sha256'))[:12]}... ({stored_editor.get('steps')} steps) there, "
                           f"{editor['sha256'][:12]}... ({editor['steps']} steps) now; it was trained again")
        elif editor and not recorded and _holds_edits(output_dir):
            details.append(f"the trained editor {settings.config['editor']!r}: not recorded there (the run was made "
                           f"before runs recorded their editor), weights with SHA-256 {editor['sha256'][:12]}... "
                           f"({editor['steps']} steps) now; whether its edits were made by this editor cannot be told")
        if stored_corpus and corpus and stored_corpus.get("fingerprint") != corpus.get("fingerprint"):
            details.append(f"the statistics corpus: {_describe_corpus(stored_corpus)} there, "
                           f"{_describe_corpus(corpus)} now; statistics from another corpus would give other edits")
        elif corpus and not corpus_recorded and _holds_edits(output_dir) and not overwrite:
            logger.warning("The run in %s edited before runs recorded the corpus of their statistics; it goes on with "
                           "%s, which cannot be checked against its earlier edits.", output_dir,
                           _describe_corpus(corpus))
        if details and not overwrite:
            raise EvaluationSettingsError(
                f"The output directory {str(output_dir)!r} holds a run with other settings ({'; '.join(details)}). "
                "Use another directory, or overwrite=True (--overwrite) to delete that run."
            )
    if overwrite:
        for name in (SETTINGS_NAME, PRE_NAME, RESULTS_NAME, CURVE_NAME, SUMMARY_NAME):
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(output_dir / EDIT_WORK_NAME, ignore_errors=True)
        delete_snapshots(output_dir)  # a stream of the other settings must not go on from them
    write_json(path, {**asdict(settings), "dataset_sha256": dataset_sha256, CONFIG_FILES_KEY: config_files,
                      EDITOR_KEY: editor, STATS_CORPUS_KEY: corpus})
    return editor


def _reconcile_file(label: str, there: dict, now: dict, key: str, stored_sha256: str | None,
                    sha256: str | None) -> str | None:
    """Compare the file setting `key` of a stored run (`there`) and of this one (`now`) by content: the same file
    named by another path (relative, moved) counts as the same (`there[key]` takes this run's path), and a file that
    changed under the same path is a difference, returned as text."""
    if sha256 is None:
        return None
    if there.get(key) != now.get(key):
        if (stored_sha256 or _file_sha256(there.get(key) or "")) == sha256:
            there[key] = now[key]
        return None
    if stored_sha256 is not None and stored_sha256 != sha256:
        return f"{label}: the file {now[key]!r} changed (SHA-256 {stored_sha256[:12]}... there, {sha256[:12]}... now)"
    return None


def _holds_edits(output_dir: Path) -> bool:
    """Whether a run has edited anything yet: recorded cases, a batch's finished work or a stream's snapshot."""
    results = output_dir / RESULTS_NAME
    return ((results.is_file() and results.stat().st_size > 0) or (output_dir / EDIT_WORK_NAME).is_dir()
            or (output_dir / SNAPSHOTS_DIR).is_dir())


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


def _differences(key: str, there, now) -> str:
    """`key: <there> there, <now> now`, or for two dicts (a method's config) the same for each field that differs."""
    if not (isinstance(there, dict) and isinstance(now, dict)):
        return f"{key}: {there!r} there, {now!r} now"
    absent = _Absent()
    fields = sorted(f for f in set(there) | set(now) if there.get(f, absent) != now.get(f, absent))
    return "; ".join(f"{key}.{f}: {there.get(f, absent)!r} there, {now.get(f, absent)!r} now" for f in fields)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def editor_requests(requests: list, sees_probes: bool = False) -> list:
    """The requests an editor receives for cases `requests`: without the rephrase, locality and portability prompts
    they are scored on, unless `sees_probes` (the run's `editor_sees_probes`)."""
    if sees_probes:
        return list(requests)
    return [replace(r, rephrase_prompts=[], locality=[], portability=[]) for r in requests]


def contradicting_cases(cases: list, error: ContradictoryRequestsError) -> dict:
    """The cases a chunk is edited without after `error` (raised for the requests of `cases`, in that order): each
    later case of a conflict, mapped to the earlier case it contradicts. Empty when the error names no conflict."""
    return {cases[later]: cases[first] for first, later in error.conflicts}


def _strip_raw(result: dict) -> dict:
    """What a case record keeps of a scoring pass: the scores, the skips, and the fluency generation when there is one
    (the raw outputs "unchanged" compares stay in `pre.jsonl`)."""
    kept = {"scores": result["scores"], "skipped": result["skipped"]}
    text = result["raw"].get("fluency_text")
    if text is not None:
        kept["fluency_text"] = text
    return kept


def run_evaluation(
    settings: EvaluationSettings,
    output_dir: str | os.PathLike,
    model=None,
    tokenizer=None,
    overwrite: bool = False,
    scorer_batch_size: int = 32,
    snapshot_every: int | None = None,
) -> dict:
    """Run (or resume) the evaluation described by `settings` into `output_dir`; return the summary.

    `snapshot_every` (sequential mode): write a snapshot of the edited state every this many edits, from which a
    stopped run resumes (see `snapshots`); `None` (default): at every checkpoint of `every:K`, every
    `DEFAULT_SNAPSHOT_EVERY` edits with `immediate` and `final` (with `final`, after the last edit too, before the
    scoring); `0`: none. With `every:K` it must be a multiple of K
    (a snapshot is only resumed from where the scores are recorded). Like `scorer_batch_size` it does not change
    what is computed, so a run may resume with another value.

    `model` and `tokenizer` default to `load_model_and_tokenizer(settings.model)`; pass them to evaluate a model held
    in memory (`settings.model` is then only its name in the records). Under several processes (`accelerate launch`,
    `torchrun`) the work is split between them and the main process writes the output; every process returns the
    summary.

    Example:

    ```python
    >>> import tempfile
    >>> from hf_knowedit.evaluation import EvaluationSettings, run_evaluation
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> requests = [{"prompt": "The capital of {} is", "subject": "Atlantis", "target_new": "Paris"}]
    >>> path = tempfile.mkdtemp() + "/cases.json"
    >>> _ = open(path, "w").write(__import__("json").dumps(requests))
    >>> settings = EvaluationSettings(method="ft", config={"num_steps": 2}, model="tiny-gpt2", dataset=path,
    ...                               fluency_tokens=0)
    >>> summary = run_evaluation(settings, tempfile.mkdtemp(), model=tiny_model("gpt2"), tokenizer=tiny_tokenizer())
    >>> summary["num_completed"], summary["world_size"]
    (1, 1)

    ```
    """
    from ..modeling import load_model_and_tokenizer, prepare_tokenizer

    processes = _Processes()
    output_dir = Path(output_dir)
    config = build_config(settings.method, settings.config)
    settings.config = {k: v for k, v in config.to_dict().items() if k not in NOT_COMPARED_CONFIG_FIELDS}
    settings.label = settings.label or default_label(settings.method, settings.config)
    snapshot_every = _snapshot_interval(settings, snapshot_every)
    if not Path(settings.dataset).exists():
        raise EvaluationSettingsError(f"The dataset file {settings.dataset!r} does not exist.")
    requests = load_edit_dataset(settings.dataset, n=settings.n, offset=settings.offset)
    editor = processes.on_main(lambda: _prepare_output(output_dir, settings, overwrite))
    if model is None:
        model, loaded_tokenizer = load_model_and_tokenizer(settings.model, dtype=getattr(torch, settings.dtype),
                                                           device_map=settings.device_map)
        tokenizer = tokenizer or loaded_tokenizer
        if settings.device_map is None and torch.cuda.is_available():  # this process's GPU (the first one alone)
            model.to(torch.device("cuda", torch.cuda.current_device()))
    if tokenizer is None:
        raise EvaluationSettingsError("Pass the model's tokenizer along with the model.")
    prepare_tokenizer(tokenizer)
    chat_template = None
    if settings.chat_template:
        requests = apply_chat_template(requests, tokenizer)
        template = tokenizer.chat_template  # its text, or a dict of named templates
        digest = (hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str)
                  else sha256_json(template))
        chat_template = {"template_sha256": digest, "edit_prompts": "templated",
                         "example_prompt": requests[0].filled_prompt}
    if isinstance(model, EditedModel):
        if model.edit_names:
            raise EvaluationSettingsError(
                f"The model already has edits {model.edit_names}; evaluate an untouched model."
            )
        edited = model
    else:
        edited = EditedModel(model, tokenizer)
    edited.tokenizer = tokenizer
    edited.eval()
    scorer = BatchScorer(edited, tokenizer, batch_size=scorer_batch_size)
    score_size = max(scorer_batch_size, 1)
    indices = [settings.offset + i for i in range(len(requests))]
    by_index = dict(zip(indices, requests))
    protocols = tuple(settings.protocols)
    start_wall = time.perf_counter()

    # 1. The untouched model.
    pre_path = output_dir / PRE_NAME
    pre_records = processes.on_main(lambda: _read_and_rewrite(pre_path))
    missing = [i for i in indices if i not in pre_records]
    if missing:
        bar = processes.progress_bar(total=len(missing), desc="pre-edit scores", leave=False)

        def score_untouched(chunk):
            results = score_cases(scorer, [by_index[i] for i in chunk], protocols, settings.fluency_tokens)
            return [{"index": i, "case_id": by_index[i].case_id, **r} for i, r in zip(chunk, results)]

        for _, results in processes.rounds(_chunks(missing, score_size), score_untouched):
            for new in results:
                if processes.is_main:
                    append_jsonl(pre_path, new)
                pre_records.update({r["index"]: r for r in new})
                bar.update(len(new))
        bar.close()

    # 2. The edits.
    results_path = output_dir / RESULTS_NAME
    curve_path = output_dir / CURVE_NAME
    done = processes.on_main(lambda: _read_and_rewrite(results_path))
    left_out = [i for i in done if i not in by_index]  # scored with a larger --n (a stream keeps its n)
    if left_out and processes.is_main:
        logger.warning("The run in %s holds %d scored cases beyond the %d selected now; its summary.json and "
                       "settings.json will describe the selected ones only (results.jsonl keeps the others: --n %d "
                       "describes them all again without recomputing).", output_dir, len(left_out), len(indices),
                       max(done) + 1 - settings.offset)
    chunks = _chunks(indices, settings.batch_size if settings.mode != "single" else 1)
    kind, every = parse_schedule(settings.eval_schedule)
    bar = processes.progress_bar(total=len(indices), desc=f"{settings.label} {settings.mode}", unit="case")
    running = _RunningMeans(protocols[0])
    for record in done.values():
        if record["index"] in by_index:
            running.add(record)
    bar.set_postfix(running.postfix())

    environment = environment_info(edited.base_model)

    def write_summary() -> dict:
        summary = summarize([done[i] for i in indices if i in done], settings,
                            wall_seconds=time.perf_counter() - start_wall, curve=read_jsonl(curve_path),
                            environment=environment, num_cases=len(indices), world_size=processes.world_size,
                            chat_template=chat_template, editor=editor)
        write_json(output_dir / SUMMARY_NAME, summary)
        return summary

    def score_and_record(chunk_ids, chunk_no, edit_seconds, num_edits):
        start = time.perf_counter()
        results = score_cases(scorer, [by_index[i] for i in chunk_ids], protocols, settings.fluency_tokens,
                              pre_raw=[pre_records[i]["raw"] for i in chunk_ids])
        eval_seconds = time.perf_counter() - start
        records = []
        for i, result in zip(chunk_ids, results):
            records.append({
                "index": i,
                "case_id": by_index[i].case_id,
                "chunk": chunk_no,
                "chunk_indices": chunk_ids,
                "mode": settings.mode,
                "num_edits_applied": num_edits,
                "pre": _strip_raw(pre_records[i]),
                "post": _strip_raw(result),
                "edit_seconds": edit_seconds,
                "eval_seconds": eval_seconds / len(chunk_ids),
                "memory": peak_memory(),
                "rank": processes.rank,
            })
        return records

    refusals: dict[int, str | None] = {}  # sequential mode: case index -> why its edit was refused (None: applied)

    def score_rounds(case_ids, chunk_no, edit_seconds, num_edits, scored_together=None):
        """Score cases of a model every process holds, in chunks of `scorer_batch_size` dealt to the processes; yield
        the records of each round of chunks. `scored_together`: the cases of the checkpoint the records belong to
        (defaults to `case_ids`)."""
        for _, results in processes.rounds(_chunks(case_ids, score_size),
                                           lambda unit: score_and_record(unit, chunk_no, edit_seconds, num_edits)):
            records = [record for unit_records in results for record in unit_records]
            for record in records:
                record["chunk_indices"] = scored_together or case_ids
                record["edit_refused"] = refusals[record["index"]]
            yield records

    def score_shared(case_ids, chunk_no, edit_seconds, num_edits):
        """The records of `score_rounds`, all rounds at once."""
        return [record for records in score_rounds(case_ids, chunk_no, edit_seconds, num_edits) for record in records]

    def commit(records):
        """Append scored records to the JSONL and the running means, advance the bar, refresh the summary."""
        append_jsonl(results_path, records)
        for record in records:
            done[record["index"]] = record
            running.add(record)
        bar.update(len(records))
        bar.set_postfix(running.postfix())
        write_summary()  # a partial summary (complete: false) survives an interruption

    def apply_edits(chunk) -> dict[int, str | None]:
        """Add the chunk's edits to the model; return, per case, why its edit was refused (`None`: applied). A method
        that refuses the edits (`EditFailedError`, the model left as it was) does not stop the run: the chunk's cases
        are scored without their edits (so a refused edit counts as a failed one). Cases that contradict an earlier
        case of their chunk (same prompt and subject, another target: `ContradictoryRequestsError`, from methods that
        solve for a chunk at once) are refused alone and the chunk is edited without them."""
        refused: dict[int, str | None] = dict.fromkeys(chunk)
        kept = list(chunk)
        while True:
            try:
                edited.add_edits(config, editor_requests([by_index[i] for i in kept], settings.editor_sees_probes),
                                 edit_name=EDIT_NAME)
            except ContradictoryRequestsError as error:
                dropped = contradicting_cases(kept, error)
                if not dropped:  # nothing to leave out: the edit cannot be made as asked
                    raise
                for index, first in dropped.items():
                    refused[index] = (f"contradicts case {by_index[first].case_id} of its chunk (the same prompt and "
                                      f"subject, another target): {config.edit_type} edits a chunk at once")
                logger.warning("Editing cases %s without the cases %s that contradict them",
                               sorted({by_index[f].case_id for f in dropped.values()}, key=str),
                               sorted((by_index[i].case_id for i in dropped), key=str))
                kept = [i for i in kept if i not in dropped]
                continue
            except EditFailedError as error:
                logger.warning("The edits of cases %s were refused: %s", [by_index[i].case_id for i in kept], error)
                refused.update(dict.fromkeys(kept, str(error)))
            return refused

    def score_in_parts(chunk, chunk_no, edit_seconds):
        """The records of a chunk of several cases, scored in parts of `scorer_batch_size` cases, each part's records
        kept in the chunk's edit work (`scores.jsonl`) as it is scored, so that a chunk stopped while scoring scores
        only the parts left when it is edited again (to the same state, from its pieces)."""
        path = _edit_work_dir(output_dir, chunk_no) / EDIT_WORK_SCORES
        stored = {r["index"]: r for r in read_jsonl(path) if r.get("chunk_indices") == chunk}
        if path.is_file():  # without a cut-off last line, before appending to it
            _rewrite_jsonl(path, list(stored.values()))
        records = []
        for part in _chunks(chunk, score_size):
            if all(i in stored for i in part):
                part_records = [stored[i] for i in part]
            else:
                part_records = score_and_record(part, chunk_no, edit_seconds, len(chunk))
                for record in part_records:
                    record["chunk_indices"] = chunk
                append_jsonl(path, part_records)
            records += part_records
        for record in records:
            record["edit_seconds"] = edit_seconds  # this run's, which counts the reused pieces' seconds
        return records

    def edit_and_score(item):
        """One chunk of `single` or `batch` mode: edit the untouched model, score, remove the edit, check."""
        chunk_no, chunk = item
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _seed(settings.seed + chunk_no)
        start = time.perf_counter()
        batch = len(chunk) > 1  # a batch keeps its edit's per-request work and its scored parts until recorded
        with (resumable_edits(_edit_work_dir(output_dir, chunk_no)) if batch else contextlib.nullcontext()) as work:
            refused = apply_edits(chunk)
        # the edit's time is that of an uninterrupted one: the pieces an earlier, stopped run computed count too
        reused_seconds = work.reused_seconds if batch else 0.0
        edit_seconds = (time.perf_counter() - start + reused_seconds) / len(chunk)
        records = (score_in_parts(chunk, chunk_no, edit_seconds) if batch
                   else score_and_record(chunk, chunk_no, edit_seconds, len(chunk)))
        stats = _edit_stats(edited)
        if EDIT_NAME in edited.edit_names:  # absent when every edit was refused
            edited.delete_edit(EDIT_NAME)
        restored = _check_restored(scorer, by_index[chunk[0]], pre_records[chunk[0]])
        for record in records:
            record["base_restored"] = restored
            record["edit_refused"] = refused[record["index"]]
            record["edit_stats"] = stats
        return records

    if settings.mode in ("single", "batch"):
        todo = [(chunk_no, chunk) for chunk_no, chunk in enumerate(chunks)
                if not all(i in done and done[i].get("chunk_indices") == chunk for i in chunk)]
        for round_items, results in processes.rounds(todo, edit_and_score):
            if processes.is_main:
                for (chunk_no, _), records in zip(round_items, results, strict=True):
                    commit(records)
                    shutil.rmtree(_edit_work_dir(output_dir, chunk_no), ignore_errors=True)
        if processes.is_main:
            with contextlib.suppress(OSError):  # the folder of the chunks' work, once none is left in it
                (output_dir / EDIT_WORK_NAME).rmdir()
    elif not all(i in done for i in indices):
        curve = processes.on_main(lambda: _trim_curve(curve_path, len(indices)))
        resume_edits = 0  # edits whose scores are recorded: recomputed to rebuild the state, not scored again
        if kind == "immediate":
            for chunk in chunks:
                if not all(i in done for i in chunk):
                    break
                resume_edits += len(chunk)
        elif kind == "every" and curve:
            resume_edits = max(point["num_edits"] for point in curve)
        edit_times: dict[int, float] = {}
        applied = 0
        editor_class = get_editor_class(config.edit_type)
        # a snapshot is loaded when no scores are owed to the edits it holds: up to the last recorded ones (a `final`
        # run scores nothing before its last edit, and has a snapshot after it while it scores)
        loadable = len(indices) if kind == "final" else resume_edits
        if snapshot_every and loadable:
            applied = _restore_snapshot(processes, output_dir, edited, editor_class, chunks, indices, loadable,
                                        edit_times, refusals)
        if resume_edits > applied:
            logger.info("Resuming: recomputing edits %d to %d without scoring them again", applied + 1, resume_edits)
        # the first checkpoint after the recomputed edits (not the first of the stream: that one is recorded already)
        next_checkpoint = (resume_edits // every + 1) * every if kind == "every" else None
        restored, position = applied, 0
        for chunk_no, chunk in enumerate(chunks):
            position += len(chunk)
            if position <= restored:
                continue  # its edit is in the snapshot
            if torch.cuda.is_available() and applied >= resume_edits:
                torch.cuda.reset_peak_memory_stats()
            _seed(settings.seed + chunk_no)
            start = time.perf_counter()
            refusals.update(apply_edits(chunk))
            edit_seconds = (time.perf_counter() - start) / len(chunk)
            applied += len(chunk)
            edit_times.update(dict.fromkeys(chunk, edit_seconds))
            scored = applied > resume_edits  # recomputed edits have their scores recorded already
            if scored and kind == "immediate":
                records = score_shared(chunk, chunk_no, edit_seconds, applied)
                if processes.is_main:
                    commit(records)
            elif scored and kind == "every" and (applied >= next_checkpoint or applied == len(indices)):
                while next_checkpoint <= applied:
                    next_checkpoint += every
                point = score_shared(indices[:applied], chunk_no, None, applied)
                if processes.is_main:
                    seconds = [edit_times[i] for i in indices[:applied]]
                    append_jsonl(curve_path, [_curve_point(applied, point, protocols, seconds)])
                    bar.update(applied - bar.n)
                    write_summary()
                if applied == len(indices):
                    for record in point:
                        record["edit_seconds"] = edit_times[record["index"]]
                    if processes.is_main:
                        append_jsonl(results_path, point)
                    done.update({r["index"]: r for r in point})
            # the chunk crossed a multiple of `snapshot_every` (a recomputed one too): snapshot the state, now that
            # its scores are written, so that a resumed run owes no scores to the edits it loads. A `final` stream
            # also snapshots its last edit, before its scoring (the long part when the edits are cheap ones)
            crossed = snapshot_every and applied // snapshot_every > (applied - len(chunk)) // snapshot_every
            last = applied == len(indices)
            if snapshot_every and ((crossed and not last) or (last and kind == "final")):
                _snapshot(processes, output_dir, edited, editor_class, indices[:applied], edit_times, refusals)
        if kind == "final":
            # recorded round by round: a run stopped while scoring resumes from the snapshot after the last edit and
            # scores the cases left (the rounds are those of a run that did not stop, with the same batch size)
            todo = [i for i in indices if i not in done]
            for records in score_rounds(todo, len(chunks) - 1, None, applied, scored_together=indices):
                for record in records:
                    record["edit_seconds"] = edit_times[record["index"]]
                if processes.is_main:
                    commit(records)
        if EDIT_NAME in edited.edit_names:  # absent when every edit was refused
            edited.delete_edit(EDIT_NAME)
        processes.on_main(lambda: delete_snapshots(output_dir))
    bar.close()

    return processes.on_main(write_summary)


def _edit_stats(edited: EditedModel) -> dict:
    """The figures of one value (number, string, flag) that the method reported for the run's edit (its steps and
    losses, the seconds of its phases: `EditedModel.get_edit(name).stats`), or `{}` when every edit was refused."""
    if EDIT_NAME not in edited.edit_names:
        return {}
    stats = edited.get_edit(EDIT_NAME).stats
    return {key: stats[key] for key in sorted(stats) if isinstance(stats[key], (bool, int, float, str))}


def _edit_work_dir(output_dir: Path, chunk_no: int) -> Path:
    """Where the edit of a batch keeps its finished per-request work (`hf_knowedit.resumable`) until the batch's scores
    are recorded, so that a run stopped during a long batch edit, or during its scoring, resumes that edit from it."""
    return output_dir / EDIT_WORK_NAME / f"chunk-{chunk_no}"


def _snapshot_interval(settings: EvaluationSettings, requested: int | None) -> int:
    """The edits between snapshots of a run (0: none); see `run_evaluation`."""
    kind, every = parse_schedule(settings.eval_schedule)
    if requested is None:
        if settings.mode != "sequential":
            return 0
        return every if kind == "every" else DEFAULT_SNAPSHOT_EVERY
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
        raise EvaluationSettingsError(f"snapshot_every must be a non-negative integer, got {requested!r}.")
    if requested and settings.mode != "sequential":
        raise EvaluationSettingsError(
            f"snapshot_every applies to mode 'sequential' (the edits of mode {settings.mode!r} are undone after each "
            "chunk, so there is no state to snapshot); leave it unset or 0."
        )
    if requested and kind == "every" and requested % every:
        raise EvaluationSettingsError(
            f"With eval_schedule {settings.eval_schedule!r}, snapshot_every must be a multiple of {every} (a stream "
            f"resumes from a checkpoint, where its scores are recorded), got {requested}."
        )
    return requested


def _restore_snapshot(processes, output_dir, edited, editor_class, chunks, indices, max_edits, edit_times,
                      refusals) -> int:
    """Install the latest snapshot (see `snapshots`) of a resumed stream that ends on a chunk boundary after at most
    `max_edits` edits; return its number of edits (0 when none could be loaded on every process: then no process keeps
    one, so that all of them recompute the same edits)."""
    at = processes.on_main(lambda: latest_snapshot(output_dir, max_edits))
    if at not in itertools.accumulate(len(chunk) for chunk in chunks):  # another batch size made it (settings forbid)
        at = 0
    restored = load_snapshot(output_dir, at, edited, EDIT_NAME, editor_class, indices[:at]) if at else None
    if not all(processes._all_gather(restored is not None)):
        if restored is not None and EDIT_NAME in edited.edit_names:
            edited.delete_edit(EDIT_NAME)
        return 0
    seconds, refused = restored
    edit_times.update(seconds)
    refusals.update(refused)
    logger.info("Resuming from the snapshot after %d edits", at)
    return at


def _snapshot(processes, output_dir, edited, editor_class, cases, edit_times, refusals) -> None:
    """Write the snapshot after the edits of `cases` (main process; a function of its own so that the lambda binds
    this call's `cases`, not the loop's variables)."""
    processes.on_main(lambda: save_snapshot(output_dir, edited, EDIT_NAME, editor_class, cases, edit_times,
                                            refusals))


def _read_and_rewrite(path: Path) -> dict[int, dict]:
    """The records of a JSONL file by case index; the file is rewritten without a line cut short."""
    records = {r["index"]: r for r in read_jsonl(path)}
    _rewrite_jsonl(path, list(records.values()))
    return records


def _trim_curve(path: Path, num_cases: int) -> list[dict]:
    """The points of a sequential run's curve; a last point whose records were not all written is dropped."""
    curve = read_jsonl(path)
    if curve and max(p["num_edits"] for p in curve) >= num_cases:
        curve = [p for p in curve if p["num_edits"] < num_cases]
    _rewrite_jsonl(path, curve)
    return curve


def _check_restored(scorer, request, pre_record) -> bool:
    """After removing an edit, the first case's edit prompt must score as before the edit (else raise)."""
    reference = pre_record["raw"].get("edit_log_prob")
    if reference is None:
        return True
    now = scorer.score_targets([request.filled_prompt], [request.target_new])[0].mean_log_prob
    if not math.isclose(now, reference, abs_tol=RESTORE_TOLERANCE):
        raise KnowEditError(
            f"After removing the edit, case {request.case_id!r} has mean log-probability {now:.6f} of its target "
            f"instead of {reference:.6f} before any edit: the base model was not restored."
        )
    return True


class _RunningMeans:
    """Running means of post-edit scores for the progress bar."""

    def __init__(self, protocol: str):
        self.protocol = protocol
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, record: dict) -> None:
        for metric in ("reliability", "generalization", "locality_unchanged", "portability"):
            result = record["post"]["scores"].get(metric, {}).get(self.protocol)
            if result is not None:
                self.sums[metric] = self.sums.get(metric, 0.0) + result["score"]
                self.counts[metric] = self.counts.get(metric, 0) + 1

    def postfix(self) -> dict:
        short = {"reliability": "rel", "generalization": "gen", "locality_unchanged": "loc", "portability": "port"}
        return {short[m]: f"{self.sums[m] / self.counts[m]:.3f}" for m in self.sums}


def _curve_point(num_edits: int, records: list[dict], protocols, edit_seconds: list[float]) -> dict:
    """A checkpoint: the scores of the cases edited so far, their refusals, and the seconds of their edits (those
    recomputed when the run resumed included: they were timed again), so that a stream stopped before its end still
    has its efficiency."""
    means = _metric_stats(records, "post", protocols)
    return {"num_edits": num_edits, "metrics": means, "edits_refused": sum(1 for r in records if r.get("edit_refused")),
            "edit_seconds_per_case": mean_ci(edit_seconds)}


def _metric_stats(records: list[dict], side: str, protocols) -> dict:
    stats: dict = {}
    for metric in METRICS:
        for protocol in (FLUENCY_PROTOCOL,) if metric == "fluency" else protocols:
            values = [r[side]["scores"][metric][protocol]["score"] for r in records
                      if protocol in r[side]["scores"].get(metric, {})]
            skipped = sum(f"{metric}/{protocol}" in r[side]["skipped"] for r in records)
            if not values and not skipped:
                continue
            stats.setdefault(metric, {})[protocol] = {**mean_ci(values, bounded=metric != "fluency"),
                                                      "skipped": skipped, "protocol": protocol}
    return stats


def mean_ci(values: list[float], bounded: bool = False) -> dict:
    """Mean, 95% confidence interval and count; `None`s when there are no values.

    `bounded`: the values are scores in [0, 1]. When every one is 0 or 1 the interval is Wilson's score interval, which
    stays inside [0, 1] and keeps a width when all cases scored the same; fractional scores (cases with several
    probes) get the normal approximation clipped to [0, 1]. Other values (seconds, fluency) get the normal
    approximation. The entry names its interval (`"interval"`).
    """
    n = len(values)
    if bounded and not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"Scores must lie in [0, 1]; got values from {min(values)} to {max(values)}.")
    binary = bounded and all(v in (0.0, 1.0) for v in values)
    interval = "wilson" if binary else NORMAL_CLIPPED if bounded else "normal"
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "interval": interval}
    mean = sum(values) / n
    if binary:
        return {"mean": mean, "ci95": wilson_interval(mean, n), "n": n, "interval": interval}
    if n == 1:
        return {"mean": mean, "ci95": [mean, mean], "n": 1, "interval": interval}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    low, high = (max(0.0, mean - half), min(1.0, mean + half)) if bounded else (mean - half, mean + half)
    return {"mean": mean, "ci95": [low, high], "n": n, "interval": interval}


def wilson_interval(mean: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson's score interval for a proportion `mean` observed over `n` cases (95% with the default `z`)."""
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def refresh_intervals(summary: dict) -> dict:
    """`summary` (a `summary.json`) with the intervals of `mean_ci(..., bounded=True)` on its scores, curve included.

    For summaries written before scores had them (entries without `"interval"`), from their means and counts alone: a
    mean of exactly 0 or 1 means every case scored it, so it gets Wilson's interval; any other mean keeps its normal
    interval, clipped to [0, 1]. Entries that name their interval and fluency (an entropy) are left as they are.
    """
    def refresh(stats: dict) -> None:
        for metric, by_protocol in stats.items():
            if metric == "fluency":
                continue
            for entry in by_protocol.values():
                if "interval" in entry:
                    continue
                mean = entry.get("mean")
                if mean in (0.0, 1.0):
                    entry["ci95"], entry["interval"] = wilson_interval(mean, entry["n"]), "wilson"
                else:
                    entry["interval"] = NORMAL_CLIPPED
                    if mean is not None:
                        entry["ci95"] = [max(0.0, entry["ci95"][0]), min(1.0, entry["ci95"][1])]

    summary["ci_method"] = CI_METHOD
    for side in summary.get("metrics", {}).values():
        refresh(side)
    for point in summary.get("curve") or []:
        refresh(point["metrics"])
    return summary


def summarize(records: list[dict], settings: EvaluationSettings, wall_seconds: float | None = None,
              curve: list[dict] | None = None, environment: dict | None = None, num_cases: int | None = None,
              world_size: int = 1, chat_template: dict | None = None, editor: dict | None = None) -> dict:
    """The summary of a run's per-case records: means with 95% CIs per metric and protocol, skips, efficiency.

    `world_size` is the number of processes of this session; `chat_template` describes the chat template the prompts
    were put into (`None`: none); `editor` identifies the trained editor of a learned method (`None`: none).
    """
    protocols = tuple(settings.protocols)
    skip_reasons: dict[str, dict[str, int]] = {}
    for record in records:
        for key, reason in record["post"]["skipped"].items():
            skip_reasons.setdefault(key, {}).setdefault(reason, 0)
            skip_reasons[key][reason] += 1
    edit_seconds = [r["edit_seconds"] for r in records if r.get("edit_seconds") is not None]
    memory = [r.get("memory", {}) for r in records]
    return refresh_intervals({  # the curve's points too, those written by an older version included
        "settings": asdict(settings),
        "method": settings.method,
        "method_label": settings.label,
        "method_config": settings.config,
        "dataset_name": Path(settings.dataset).stem,
        "mode": settings.mode,
        "batch_size": settings.batch_size,
        "eval_schedule": settings.eval_schedule,
        "protocols": list(protocols),
        "seed": settings.seed,
        "chat_template": chat_template,
        EDITOR_KEY: editor,
        "world_size": world_size,
        "num_cases": num_cases if num_cases is not None else len(records),
        "num_completed": len(records),
        "complete": num_cases is None or len(records) == num_cases,
        "ci_method": CI_METHOD,
        "aggregation": "per case: mean over its probes; per run: mean over cases",
        "metrics": {"pre": _metric_stats(records, "pre", protocols), "post": _metric_stats(records, "post", protocols)},
        "skip_reasons": skip_reasons,
        "efficiency": {
            "edit_seconds_per_case": mean_ci(edit_seconds),
            "edit_seconds_total": sum(edit_seconds),
            "eval_seconds_total": sum(r.get("eval_seconds") or 0.0 for r in records),
            "wall_seconds_this_session": wall_seconds,
            "rss_peak_bytes": max((m.get("rss_peak_bytes", 0) for m in memory), default=None),
            "cuda_max_allocated_bytes": max((m.get("cuda_max_allocated_bytes", 0) for m in memory), default=None)
            if torch.cuda.is_available() else None,
        },
        "base_restored_checks": sum(1 for r in records if r.get("base_restored")),
        "edits_refused": sum(1 for r in records if r.get("edit_refused")),
        "curve": curve or [],
        "environment": environment or {},
    })


def load_summary(output_dir: str | os.PathLike) -> dict:
    path = Path(output_dir) / SUMMARY_NAME
    if not path.is_file():
        raise EvaluationSettingsError(f"{str(path)!r} does not exist: {str(output_dir)!r} is not a finished run.")
    return json.loads(path.read_text(encoding="utf-8"))


__all__ = [
    "ChatTemplateError",
    "EvaluationProcessError",
    "EvaluationSettings",
    "EvaluationSettingsError",
    "contradicting_cases",
    "editor_requests",
    "load_summary",
    "mean_ci",
    "parse_schedule",
    "refresh_intervals",
    "run_evaluation",
    "summarize",
    "wilson_interval",
]
