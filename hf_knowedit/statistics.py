"""Second-moment statistics of the keys of an MLP: the `C = E[k kᵀ]` of ROME, MEMIT and AlphaEdit.

The key `k` at a layer is the input of the MLP output projection (`down_proj`, `c_proj`, `fc2`, ...), so that the
projection computes `v = W k`. ROME (Meng et al. 2022, eq. 2) solves `min ‖W K - V‖` for a new key-value pair under
the constraint that the old keys keep their values, which needs the uncentred second moment `C = K Kᵀ / n` of keys
drawn from ordinary text; MEMIT adds it as a ridge term, and AlphaEdit projects updates onto the directions that `C`
leaves (almost) empty.

[`LayerStatistics`] computes `C` from a text corpus in one batched pass that stops at the layer, caches it on disk
keyed by everything it depends on, and saves, loads and shares it like any other artifact.

How a corpus is read (`corpus=`):

- `None`: the local text file or folder named by `HF_KNOWEDIT_STATS_CORPUS` if set, else WikiText-103 (train) through
  `datasets`; when neither can be had, [`CorpusNotFoundError`] says how to provide one.
- a `str` / `Path` to a text file or a folder of text files (`*.txt`, `*.text`, `*.raw`, `*.md`, `*.tokens` or no
  suffix, read recursively in sorted order, hidden files skipped). Files named `*.tokens` are tokenised WikiText:
  they are split into articles at their `= Title =` headings and detokenised with [`detokenize_wikitext`]. Other
  files are split into documents at blank lines.
- a `datasets.Dataset` (or `IterableDataset`) with a text column (`text_column`, defaults to `"text"`).
- any iterable of strings, one document each.

How texts become key vectors: documents are tokenised without special tokens and concatenated, each followed by the
tokenizer's EOS token, into one stream that is cut into sequences of `max_length` tokens (each sequence starts with
the BOS token when the tokenizer adds one to every text). The stream is cut off after exactly `num_tokens` tokens, so
`count == num_tokens` unless the corpus is shorter. Every non-padding position of every sequence is one key.

How a corpus is fingerprinted (the disk cache key): files by SHA-256 over their relative names and contents (so a
copy of the corpus elsewhere, or a fresh checkout of it, shares the cache, and a file changed in place does not; each
file is read once per process, a few seconds per GB, and its digest kept by path, size and modification time); datasets
by their `datasets` fingerprint and the text column; other iterables by SHA-256 over their first 1,000 strings and
their length when they have one (so two iterables that agree on their first 1,000 strings and length share a cache
entry: pass `use_cache=False` for such data).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import socket
import tempfile
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .architectures import linear_shape, resolve_layout
from .devices import execution_device, input_device, materialized_weight
from .distributed import all_reduce, collective_device, rank_and_world_size
from .errors import (
    ArtifactError,
    BaseModelMismatchError,
    CorpusNotFoundError,
    InsufficientTokensError,
    SingularStatisticsError,
    StatisticsError,
)
from .fingerprint import check_fingerprint, model_fingerprint, model_identity
from .hub import atomic_directory, push_folder_to_hub, resolve_artifact_dir
from .modeling import hf_home
from .utils import dump_json, get_logger, sha256_json, tqdm, write_json
from .version import __version__


logger = get_logger(__name__)

CORPUS_ENV = "HF_KNOWEDIT_STATS_CORPUS"
CACHE_ENV = "HF_KNOWEDIT_STATS_CACHE"
WEIGHTS_NAME = "statistics.safetensors"
CONFIG_NAME = "statistics_config.json"
CARD_NAME = "README.md"
ARTIFACT_TYPE = "layer_statistics"
# Gupta et al. 2025 (arXiv 2506.04226): about 10 x d_k keys keep over 95% of editing performance.
RECOMMENDED_TOKENS_PER_DIM = 10
FINGERPRINT_HEAD_STRINGS = 1000
TEXT_SUFFIXES = (".txt", ".text", ".raw", ".md", ".tokens", "")
# Bump when the way texts become key vectors changes: it is part of every cache key.
_PACKING_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DOCS_PER_TOKENIZER_CALL = 16


class _StopForward(Exception):
    """Raised by the hook on the deepest layer once its input is captured, to skip the rest of the forward pass."""


# Switch for benchmarks only: `False` runs every forward pass to the end (same result, about 3x slower).
_STOP_AT_LAYER = True


# ----------------------------------------------------------------------------------------------------- corpus
_WIKITEXT_REPLACEMENTS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", ""))
_SPACE_BEFORE = re.compile(r" +([.,;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{$]) +")
_QUOTED = re.compile(r'" ([^"]*?) "')
_CONTRACTION = re.compile(r" ('s|'t|'re|'ve|'m|'ll|'d|n't)(?=\s|$)")
_SPACES = re.compile(r"[ \t]{2,}")


def detokenize_wikitext(text: str) -> str:
    """Undo the tokenisation of WikiText-103's `*.tokens` files, so that a model's tokenizer sees ordinary text.

    The rules, applied in order: `" @-@ "`, `" @,@ "`, `" @.@ "` become `-`, `,`, `.` (as in `2 @,@ 000`); `<unk>`
    (a word out of WikiText's vocabulary, which cannot be recovered) is dropped; spaces before closing punctuation
    (`. , ; : ! ? % ) ] }`) and after opening brackets (`( [ { $`) are removed; `" quoted "` becomes `"quoted"`;
    `'s`, `'t` (WikiText writes `don 't`) and the like are joined to the word before; runs of spaces are collapsed.

    Args:
        text (`str`):
            One line (paragraph) of a WikiText `*.tokens` file, or several joined by newlines.

    Example:

    ```py
    >>> detokenize_wikitext(' a guest @-@ starring role as " Craig " in Teddy \\'s Story ( 2 @,@ 000 ) . ')
    'a guest-starring role as "Craig" in Teddy\\'s Story (2,000).'

    ```
    """
    for old, new in _WIKITEXT_REPLACEMENTS:
        text = text.replace(old, new)
    text = _QUOTED.sub(r'"\1"', text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = _CONTRACTION.sub(r"\1", text)
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))


def _wikitext_documents(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles: a top-level heading `= Title =` starts one, `= = Section = =` continues it.

    Each article is its title, its section titles and its paragraphs, detokenised and joined by blank lines.
    """
    article: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if len(line) > 2 and line.startswith("= ") and line.endswith(" ="):
            title = detokenize_wikitext(line.strip("=").strip(" ="))
            if not line.startswith("= ="):  # a new article
                if article:
                    yield "\n\n".join(article)
                article = []
            if title:
                article.append(title)
            continue
        paragraph = detokenize_wikitext(line)
        if paragraph:
            article.append(paragraph)
    if article:
        yield "\n\n".join(article)


def _paragraph_documents(lines: Iterable[str]) -> Iterator[str]:
    """Group lines into documents separated by blank lines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


@dataclass
class _Corpus:
    """A resolved corpus: what it is (JSON, recorded in metadata), its fingerprint, and how to read its documents."""

    description: dict
    fingerprint: str
    read: Callable[[], Iterator[str]]

    def to_json(self) -> dict:
        return {**self.description, "fingerprint": self.fingerprint}


_CONTENT_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> SHA-256 of the file's bytes


def _content_sha256(file: Path) -> str:
    """The SHA-256 of a corpus file's bytes, read once per process while its size and modification time stay."""
    from .artifacts import file_sha256

    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _CONTENT_DIGESTS:
        _CONTENT_DIGESTS[key] = file_sha256(file)
    return _CONTENT_DIGESTS[key]


def _files_corpus(path: Path, source: str) -> _Corpus:
    path = path.expanduser().resolve()
    if path.is_file():
        root, files = path.parent, [path]
    elif path.is_dir():
        root = path
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file()
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
            and file.suffix.lower() in TEXT_SUFFIXES
        )
        if not files:
            raise CorpusNotFoundError(
                f"The corpus folder {path} holds no text file (suffixes "
                f"{', '.join(s or '(none)' for s in TEXT_SUFFIXES)}). Put text files there, or pass corpus= a file, a "
                "`datasets` dataset or a list of strings."
            )
    else:
        raise CorpusNotFoundError(
            f"The corpus {path} ({source}) does not exist. Give an existing text file or folder of text files."
        )
    entries = [[file.relative_to(root).as_posix(), file.stat().st_size, _content_sha256(file)] for file in files]
    fingerprint = sha256_json({"kind": "files-content", "files": entries, "packing": _PACKING_VERSION})

    def read() -> Iterator[str]:
        for file in files:
            with open(file, encoding="utf-8", errors="replace") as handle:
                if file.suffix.lower() == ".tokens":
                    yield from _wikitext_documents(handle)
                else:
                    yield from _paragraph_documents(handle)

    description = {
        "kind": "files",
        "source": source,
        "path": str(path),
        "files": [entry[0] for entry in entries],
        "num_bytes": sum(entry[1] for entry in entries),
        "wikitext_detokenized": [entry[0] for entry in entries if entry[0].lower().endswith(".tokens")],
    }
    return _Corpus(description, fingerprint, read)


def _dataset_corpus(dataset, text_column: str, source: str, wikitext: bool = False) -> _Corpus:
    columns = list(getattr(dataset, "column_names", None) or [])
    if columns and text_column not in columns:
        raise StatisticsError(
            f"The dataset has no column {text_column!r}; its columns are {columns}. Pass text_column= the column "
            "holding the text."
        )
    info = getattr(dataset, "info", None)
    description = {
        "kind": "datasets",
        "source": source,
        "builder_name": getattr(info, "builder_name", None),
        "config_name": getattr(info, "config_name", None),
        "split": str(getattr(dataset, "split", None)) if getattr(dataset, "split", None) is not None else None,
        "num_rows": getattr(dataset, "num_rows", None),
        "text_column": text_column,
        "wikitext_detokenized": wikitext,
    }
    dataset_fingerprint = getattr(dataset, "_fingerprint", None)

    def rows() -> Iterator[str]:
        for batch in dataset.iter(batch_size=256):
            for text in batch[text_column]:
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise StatisticsError(
                        f"The column {text_column!r} holds {type(text).__name__} values, not strings. Pass "
                        "text_column= a column of text."
                    )
                yield text

    def read() -> Iterator[str]:
        return _wikitext_documents(rows()) if wikitext else (text for text in rows() if text.strip())

    if dataset_fingerprint is None:  # an IterableDataset: fingerprint its first strings
        head = list(itertools.islice(rows(), FINGERPRINT_HEAD_STRINGS))
        fingerprint = sha256_json({"kind": "datasets-head", "head": _hash_strings(head), **description})
    else:
        description["dataset_fingerprint"] = dataset_fingerprint
        fingerprint = sha256_json(
            {"kind": "datasets", "fingerprint": dataset_fingerprint, "column": text_column, "wikitext": wikitext,
             "packing": _PACKING_VERSION}
        )
    return _Corpus(description, fingerprint, read)


def _hash_strings(strings: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in strings:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _iterable_corpus(iterable: Iterable[str]) -> _Corpus:
    size = len(iterable) if hasattr(iterable, "__len__") else None
    if isinstance(iterable, Sequence):
        head = list(iterable[:FINGERPRINT_HEAD_STRINGS]) if size else []

        def read() -> Iterator[str]:
            return iter(iterable)

    else:  # a one-shot iterator: keep what the fingerprint read, and read it first
        iterator = iter(iterable)
        head = list(itertools.islice(iterator, FINGERPRINT_HEAD_STRINGS))
        consumed = [False]

        def read() -> Iterator[str]:
            if consumed[0]:
                raise StatisticsError(
                    "This corpus is a one-shot iterator that was already read. Pass a list of strings instead."
                )
            consumed[0] = True
            return itertools.chain(head, iterator)

    for text in head:
        if not isinstance(text, str):
            raise StatisticsError(
                f"corpus= must hold strings, but one item is a {type(text).__name__}. Pass a list of texts, a path, "
                "or a `datasets` dataset."
            )
    description = {"kind": "iterable", "source": "argument", "type": type(iterable).__name__, "length": size}
    fingerprint = sha256_json(
        {"kind": "iterable", "head": _hash_strings(head), "length": size, "packing": _PACKING_VERSION}
    )

    def checked() -> Iterator[str]:
        for text in read():
            if not isinstance(text, str):
                raise StatisticsError(f"corpus= must hold strings, but one item is a {type(text).__name__}.")
            if text.strip():
                yield text

    return _Corpus(description, fingerprint, checked)


def _env_corpus() -> _Corpus | None:
    """The text file or folder `$HF_KNOWEDIT_STATS_CORPUS` names, or `None` when it is not set."""
    path = os.environ.get(CORPUS_ENV, "").strip()
    return _files_corpus(Path(path), f"env:{CORPUS_ENV}") if path else None


def _default_corpus() -> _Corpus:
    from_env = _env_corpus()
    if from_env is not None:
        return from_env
    reason = "the `datasets` package is not installed"
    try:
        from datasets import load_dataset
    except ImportError:
        load_dataset = None
    unreachable = _hub_unreachable() if load_dataset is not None else None
    if unreachable:  # `datasets` would retry for about 30 s before failing
        reason = (f"the Hugging Face Hub cannot be reached to load WikiText-103 ({unreachable}; set HF_HUB_OFFLINE=1 "
                  "to use a copy in the `datasets` cache)")
    elif load_dataset is not None:
        try:
            dataset = load_dataset("wikitext", "wikitext-103-raw-v1", split="train")
            return _dataset_corpus(dataset, "text", "default:wikitext-103-raw-v1", wikitext=True)
        except Exception as error:  # offline, no cache, hub errors: all mean "not available here"
            reason = f"loading WikiText-103 through `datasets` failed ({type(error).__name__}: {error})"
    raise CorpusNotFoundError(
        "No corpus was given for the second-moment statistics, the environment variable "
        f"{CORPUS_ENV} is not set, and {reason}. Set {CORPUS_ENV}=/path/to/text/file/or/folder (for example the "
        "WikiText files in ../shared/data/wikitext), or pass corpus= a text file, a folder, a `datasets` dataset or "
        "a list of strings."
    )


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub's host cannot be reached by a direct connection, or `None` when it can, or when that is not for
    this check to say (offline mode is on: `datasets` reads its cache; a proxy is configured: the connection goes
    through it)."""
    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in proxies):
        return None
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"{endpoint.hostname}:{port}: {error}"
    return None


def resolve_corpus(corpus=None, text_column: str = "text") -> _Corpus:
    """Turn any accepted `corpus=` into a readable corpus with a description and a fingerprint (see the module doc)."""
    if isinstance(corpus, _Corpus):
        return corpus
    if corpus is None:
        return _default_corpus()
    if isinstance(corpus, (str, os.PathLike)):
        return _files_corpus(Path(corpus), "argument")
    if hasattr(corpus, "column_names") and hasattr(corpus, "iter"):
        return _dataset_corpus(corpus, text_column, "argument")
    if isinstance(corpus, Iterable) and not isinstance(corpus, (bytes, dict)):
        return _iterable_corpus(corpus)
    raise StatisticsError(
        f"corpus= must be a path, a `datasets` dataset or an iterable of strings, got {type(corpus).__name__}."
    )


def corpus_identity(corpus: str | os.PathLike | None = None) -> dict:
    """What a run records of the corpus its statistics come from, without reading the corpus for keys: for a text
    file or folder (`corpus`, else `$HF_KNOWEDIT_STATS_CORPUS`), its description and content fingerprint (see the
    module doc); for the default WikiText-103 through `datasets`, its name only (`datasets` is not loaded).

    Raises [`CorpusNotFoundError`] when the path given does not exist or holds no text file.

    Example:

    ```python
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.txt").write_text("One text.\\n\\nAnother text.\\n")
    >>> identity = corpus_identity(folder)
    >>> identity["kind"], identity["files"], len(identity["fingerprint"])
    ('files', ['a.txt'], 64)

    ```
    """
    resolved = resolve_corpus(corpus) if corpus is not None else _env_corpus()
    if resolved is not None:
        return resolved.to_json()
    return {"kind": "datasets", "source": "default:wikitext-103-raw-v1", "fingerprint": None}


# ---------------------------------------------------------------------------------------------------- packing
def _prefix_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before every text (Llama's BOS), or `[]` (GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special and with_special[0] == bos and (not without or without[0] != bos) else []


def pack_sequences(corpus, tokenizer, num_tokens: int, max_length: int, text_column: str = "text") -> list[list[int]]:
    """The token sequences whose keys make up the statistics, in order: at most `num_tokens` tokens in all.

    Documents are tokenised without special tokens and each is followed by the EOS token; the stream is cut into
    sequences of `max_length` tokens, each starting with the tokenizer's BOS token when it adds one. Only the last
    sequence can be shorter. Under `accelerate launch`, process `r` of `w` takes the sequences `r, r + w, ...`.

    Example:

    ```py
    >>> from tests.tiny_models import tiny_tokenizer
    >>> pack_sequences(["one two three", "four"], tiny_tokenizer(), num_tokens=5, max_length=3)  # 50256 is EOS
    [[505, 734, 1115], [50256, 14337]]

    ```
    """
    corpus = resolve_corpus(corpus, text_column)
    prefix = _prefix_tokens(tokenizer)
    if max_length <= len(prefix):
        raise StatisticsError(f"max_length={max_length} leaves no room for text after the prefix tokens {prefix}.")
    eos = getattr(tokenizer, "eos_token_id", None)
    separator = [eos] if eos is not None else []
    body = max_length - len(prefix)
    sequences: list[list[int]] = []
    current: list[int] = []
    total = 0
    documents = corpus.read()
    while total < num_tokens:
        chunk = list(itertools.islice(documents, _DOCS_PER_TOKENIZER_CALL))
        if not chunk:
            break
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream = list(ids) + separator
            position = 0
            while position < len(stream) and total < num_tokens:
                if not current:
                    current = list(prefix)
                    total += len(prefix)
                take = min(body - (len(current) - len(prefix)), len(stream) - position, num_tokens - total)
                current.extend(stream[position : position + take])
                position += take
                total += take
                if len(current) == max_length or total >= num_tokens:
                    sequences.append(current)
                    current = []
            if total >= num_tokens:
                break
    if len(current) > len(prefix):
        sequences.append(current)
    return sequences


# --------------------------------------------------------------------------------------------------- caching
def stats_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where statistics are cached: `cache_dir`, else `$HF_KNOWEDIT_STATS_CACHE`, else `$HF_HOME/hf_knowedit/stats`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return hf_home() / "hf_knowedit" / "stats"


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise StatisticsError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}.")
    return name


@dataclass
class _Target:
    """One layer whose statistics are asked for: where its module is, its fingerprint and its cache key."""

    layer: int
    path: str
    module: nn.Module
    d_k: int
    fingerprint: dict
    key: str

    def cache_dir(self, root: Path, model, dtype_name: str, num_tokens: int) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "--", str(model_identity(model)["name_or_path"] or "model")).strip("-.")
        return root / (name or "model") / f"{self.path}-{dtype_name}-{num_tokens}tok-{self.key[:16]}"


def _targets(model, layers, corpus: _Corpus, num_tokens: int, dtype_name: str, max_length: int) -> list[_Target]:
    layout = resolve_layout(model)
    targets = []
    for layer in layers:
        layout.check_layer(layer, "layer")
        path = layout.mlp_out_path(layer)
        module = layout.mlp_out(model, layer)
        fingerprint = model_fingerprint(model, {f"{path}.weight": materialized_weight(module)})
        model_sha = sha256_json(
            {"identity": model_identity(model), "weight_sha256": fingerprint["tensors"][f"{path}.weight"]["sha256"]}
        )
        key = sha256_json(
            {"model": model_sha, "layer": layer, "module": path, "corpus": corpus.fingerprint,
             "num_tokens": num_tokens, "dtype": dtype_name, "max_length": max_length, "packing": _PACKING_VERSION}
        )
        targets.append(_Target(layer, path, module, linear_shape(module)[1], fingerprint, key))
    return targets


def _effective_max_length(model, max_length: int) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise StatisticsError(f"max_length must be an integer >= 2, got {max_length!r}.")
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        logger.info("max_length=%d is more than the model's %d positions; using %d.", max_length, limit, limit)
        return limit
    return max_length


# ------------------------------------------------------------------------------------------------- the pass
def _accumulate(model, targets: list[_Target], sequences: list[list[int]], tokenizer, dtype, batch_tokens: int,
                progress: bool) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """Run the model over `sequences` and return the sums `Σ k kᵀ` and the counts of keys of each target layer."""
    rank, world = rank_and_world_size()
    local = sequences[rank::world]
    per_batch = max(1, batch_tokens // max(len(s) for s in sequences))
    device = input_device(model)
    sums, counts = {}, {}
    for target in targets:
        module_device = execution_device(target.module)
        acc_device = module_device if module_device.type != "mps" else torch.device("cpu")
        sums[target.layer] = torch.zeros(target.d_k, target.d_k, dtype=dtype, device=acc_device)
        counts[target.layer] = 0
    deepest = max(t.layer for t in targets)
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(target: _Target):
        def hook(module, args, kwargs):
            keys = args[0] if args else next(iter(kwargs.values()))
            mask = mask_holder["mask"]
            if keys.shape[:-1].numel() != mask.numel():
                raise StatisticsError(
                    f"The input of {target.path} has shape {tuple(keys.shape)}, which does not line up with the "
                    f"{tuple(mask.shape)} tokens of the batch; this module cannot be used for key statistics."
                )
            selected = keys.reshape(-1, keys.shape[-1])[mask.reshape(-1).to(keys.device)]
            acc = sums[target.layer]
            selected = selected.to(device=acc.device, dtype=acc.dtype)
            acc.addmm_(selected.T, selected)
            counts[target.layer] += selected.shape[0]
            if _STOP_AT_LAYER and target.layer == deepest:
                raise _StopForward

        return hook

    handles = [t.module.register_forward_pre_hook(make_hook(t), with_kwargs=True) for t in targets]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    was_training = model.training
    model.eval()
    desc = f"Key statistics, layer{'s' if len(targets) > 1 else ''} {', '.join(str(t.layer) for t in targets)}"
    bar = tqdm(total=sum(len(s) for s in local), unit="tok", desc=desc, **({} if progress else {"disable": True}))
    try:
        with torch.no_grad():
            for start in range(0, len(local), per_batch):
                batch = local[start : start + per_batch]
                width = max(len(s) for s in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, sequence in enumerate(batch):
                    ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
                    mask[row, : len(sequence)] = 1
                mask_holder["mask"] = mask.bool()
                ids, mask = ids.to(device), mask.to(device)
                inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
                if encoder_decoder:
                    inputs.update(decoder_input_ids=ids, decoder_attention_mask=mask)
                try:
                    model(**inputs)
                except _StopForward:
                    pass
                bar.update(int(mask.sum()))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if world > 1:
        for target in targets:
            acc = sums[target.layer]
            all_reduce(acc)
            count = torch.tensor([counts[target.layer]], dtype=torch.int64, device=acc.device)
            counts[target.layer] = int(all_reduce(count).item())
    return sums, counts


# ------------------------------------------------------------------------------------------------ the class
class LayerStatistics:
    """Uncentred second moment `C = E[k kᵀ]` of the input `k` of the MLP output projection at one layer.

    This is the `C` of ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", eq. 2), the
    `C₀ = λ E[k kᵀ]` of MEMIT (Meng et al. 2023, eq. 14), and the `K₀K₀ᵀ` whose null space AlphaEdit (Fang et al.
    2025) projects updates onto. Compute it with [`~LayerStatistics.compute`] (or [`get_layer_statistics`], which
    caches in memory too), share it with [`~LayerStatistics.push_to_hub`] and [`~LayerStatistics.from_pretrained`].

    Attributes:
        mom2 (`torch.Tensor`):
            `(d_k, d_k)` second moment, already divided by `count`, on CPU, in the accumulation dtype (fp32 or fp64).
        count (`int`):
            The number of key vectors (non-padding tokens) accumulated.
        metadata (`dict`):
            The model fingerprint (identity and digest of the module's weight), `layer`, `module_path`, `d_k`,
            `corpus` (description and fingerprint), `num_tokens` asked for, `count`, `max_length`, `dtype`,
            `cache_key` and `hf_knowedit_version`.

    Example:

    ```py
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    >>> texts = [f"Paris is the capital of France, said person number {i}." for i in range(200)]
    >>> stats = LayerStatistics.compute(model, tokenizer, 1, corpus=texts, num_tokens=1000, use_cache=False,
    ...                                 progress=False)
    >>> tuple(stats.second_moment.shape), stats.count, stats.metadata["module_path"]
    ((64, 64), 1000, 'transformer.h.1.mlp.c_proj')

    ```
    """

    def __init__(self, mom2: torch.Tensor, count: int, metadata: dict | None = None):
        if not isinstance(mom2, torch.Tensor) or mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
            raise StatisticsError(f"mom2 must be a square (d_k, d_k) tensor, got {getattr(mom2, 'shape', mom2)!r}.")
        if mom2.dtype not in (torch.float32, torch.float64):
            raise StatisticsError(f"mom2 must be float32 or float64, got {mom2.dtype}.")
        self.mom2 = mom2.detach().cpu()
        self.count = int(count)
        self.metadata = dict(metadata or {})
        self._projectors: dict[tuple[float, bool], torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------ views
    @property
    def second_moment(self) -> torch.Tensor:
        """`E[k kᵀ]`: the sum of `k kᵀ` over the keys divided by their count (`mom2`)."""
        return self.mom2

    @property
    def layer(self) -> int | None:
        return self.metadata.get("layer")

    @property
    def module_path(self) -> str | None:
        return self.metadata.get("module_path")

    @property
    def d_k(self) -> int:
        return int(self.mom2.shape[0])

    def __repr__(self) -> str:
        return (
            f"LayerStatistics(layer={self.layer}, module_path={self.module_path!r}, d_k={self.d_k}, "
            f"count={self.count}, dtype={_dtype_name(self.mom2.dtype)})"
        )

    # ---------------------------------------------------------------------------------------------- compute
    @classmethod
    def compute(
        cls,
        model,
        tokenizer,
        layer: int,
        corpus=None,
        num_tokens: int = 100_000,
        dtype: torch.dtype = torch.float32,
        batch_tokens: int = 4096,
        max_length: int = 256,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: bool = True,
        text_column: str = "text",
    ) -> LayerStatistics:
        """Compute (or load from the disk cache) the second moment of the keys at `layer`.

        Args:
            model (`PreTrainedModel`):
                The base model (without active edits: their effect on earlier layers would enter the statistics).
            tokenizer (`PreTrainedTokenizerBase`):
                The model's tokenizer.
            layer (`int`):
                The block whose MLP output projection's input is measured.
            corpus (*optional*):
                A path to a text file or folder, a `datasets` dataset, an iterable of strings, or `None` for the
                default (`$HF_KNOWEDIT_STATS_CORPUS`, else WikiText-103 through `datasets`). See the module doc.
            num_tokens (`int`, *optional*, defaults to `100_000`):
                How many key vectors (non-padding tokens) to accumulate; at least `d_k`, ideally `10 * d_k` or more.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
                Accumulation and storage dtype, `torch.float32` or `torch.float64`.
            batch_tokens (`int`, *optional*, defaults to `4096`):
                Tokens per forward pass (`batch_tokens // max_length` sequences).
            max_length (`int`, *optional*, defaults to `256`):
                Length of the packed sequences (capped at the model's number of positions).
            cache_dir (`str` or `os.PathLike`, *optional*):
                Disk cache root; defaults to `$HF_KNOWEDIT_STATS_CACHE`, else `$HF_HOME/hf_knowedit/stats`.
            use_cache (`bool`, *optional*, defaults to `True`):
                Read and write the disk cache.
            progress (`bool`, *optional*, defaults to `True`):
                Show a progress bar (also switched off by `HF_KNOWEDIT_DISABLE_PROGRESS_BARS=1`).
            text_column (`str`, *optional*, defaults to `"text"`):
                The column of a `datasets` corpus that holds the text.

        Raises:
            [`InsufficientTokensError`]: fewer tokens than `d_k` asked for or found in the corpus.
            [`CorpusNotFoundError`]: no corpus given and no default available.
        """
        return cls.compute_many(
            model, tokenizer, [layer], corpus=corpus, num_tokens=num_tokens, dtype=dtype, batch_tokens=batch_tokens,
            max_length=max_length, cache_dir=cache_dir, use_cache=use_cache, progress=progress,
            text_column=text_column,
        )[layer]

    @classmethod
    def compute_many(
        cls,
        model,
        tokenizer,
        layers: Sequence[int],
        corpus=None,
        num_tokens: int = 100_000,
        dtype: torch.dtype = torch.float32,
        batch_tokens: int = 4096,
        max_length: int = 256,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: bool = True,
        text_column: str = "text",
    ) -> dict[int, LayerStatistics]:
        """[`~LayerStatistics.compute`] for several layers in ONE pass over the corpus, stopped after the deepest.

        Each layer is cached on its own, so a later call for a subset (or superset) reuses what is there and runs the
        model only for the layers missing, up to the deepest of those.
        """
        if isinstance(layers, int):
            layers = [layers]
        layers = list(dict.fromkeys(layers))
        if not layers:
            raise StatisticsError("layers must name at least one layer.")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise StatisticsError(f"num_tokens must be a positive integer, got {num_tokens!r}.")
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise StatisticsError(f"batch_tokens must be a positive integer, got {batch_tokens!r}.")
        dtype_name = _dtype_name(dtype)
        max_length = _effective_max_length(model, max_length)
        corpus = resolve_corpus(corpus, text_column)
        targets = _targets(model, layers, corpus, num_tokens, dtype_name, max_length)
        widest = max(t.d_k for t in targets)
        if num_tokens < widest:
            raise InsufficientTokensError(_too_few_message(f"num_tokens={num_tokens} asks for", num_tokens, widest))
        rank, world = rank_and_world_size()
        root = stats_cache_root(cache_dir)

        results: dict[int, LayerStatistics] = {}
        if use_cache:
            for target in targets:
                cached = _load_cached(target.cache_dir(root, model, dtype_name, num_tokens), target.key)
                if world > 1:  # use the cache only if every process found it, or they would go out of step
                    found = torch.tensor([int(cached is not None)], device=collective_device())
                    if not int(all_reduce(found, op="min").item()):
                        cached = None
                if cached is not None:
                    logger.info("Loaded the statistics of %s from the cache.", target.path)
                    results[target.layer] = cached
        missing = [t for t in targets if t.layer not in results]
        if missing:
            sequences = pack_sequences(corpus, tokenizer, num_tokens, max_length)
            found = sum(len(s) for s in sequences)
            needed = max(t.d_k for t in missing)
            if found < needed:
                raise InsufficientTokensError(_too_few_message("The corpus gives only", found, needed))
            if found < num_tokens:
                logger.warning("The corpus holds %d tokens, fewer than the num_tokens=%d asked for.", found, num_tokens)
            if found < RECOMMENDED_TOKENS_PER_DIM * needed:
                logger.warning(
                    "Statistics from %d tokens for a key space of width %d: about %d (10 x d_k, Gupta et al. 2025, "
                    "arXiv 2506.04226) are recommended.", found, needed, RECOMMENDED_TOKENS_PER_DIM * needed,
                )
            sums, counts = _accumulate(
                model, missing, sequences, tokenizer, _DTYPES[dtype_name], batch_tokens, progress
            )
            for target in missing:
                count = counts[target.layer]
                mom2 = (sums[target.layer] / count).cpu()
                metadata = {
                    "artifact_type": ARTIFACT_TYPE,
                    "model_fingerprint": target.fingerprint,
                    "layer": target.layer,
                    "module_path": target.path,
                    "d_k": target.d_k,
                    "corpus": corpus.to_json(),
                    "num_tokens": num_tokens,
                    "count": count,
                    "max_length": max_length,
                    "dtype": dtype_name,
                    "cache_key": target.key,
                    "world_size": world,
                    "hf_knowedit_version": __version__,
                }
                stats = cls(mom2, count, metadata)
                stats._warn_if_degenerate()
                results[target.layer] = stats
                if use_cache and rank == 0:
                    directory = target.cache_dir(root, model, dtype_name, num_tokens)
                    try:
                        stats.save_pretrained(directory)
                    except OSError as error:
                        logger.warning("Could not cache the statistics of %s at %s: %s", target.path, directory, error)
        return {layer: results[layer] for layer in layers}

    def _warn_if_degenerate(self) -> None:
        dead = int((self.mom2.diagonal() <= 0).sum())
        if dead:
            logger.warning(
                "%d of the %d key features at %s were zero on every token of the corpus: the second moment is "
                "singular (ROME's C⁻¹ does not exist). Use more or more varied text.", dead, self.d_k, self.module_path,
            )

    # ------------------------------------------------------------------------------------------------ checks
    def check_compatible(self, model, layer: int) -> None:
        """Raise [`~hf_knowedit.errors.BaseModelMismatchError`] unless these statistics were computed for `layer` of
        `model` (same module path, same width, same weights of the module up to dtype rounding)."""
        layout = resolve_layout(model)
        layout.check_layer(layer, "layer")
        path = layout.mlp_out_path(layer)
        if self.layer is not None and (self.layer != layer or self.module_path != path):
            raise BaseModelMismatchError(
                f"These statistics were computed for layer {self.layer} ({self.module_path}), but layer {layer} "
                f"({path}) was asked for. Compute statistics for layer {layer}, or edit layer {self.layer}."
            )
        module = layout.mlp_out(model, layer)
        d_k = linear_shape(module)[1]
        if d_k != self.d_k:
            raise BaseModelMismatchError(
                f"These statistics have width d_k={self.d_k}, but {path} takes inputs of width {d_k}. They were made "
                "for another model; compute them for this one."
            )
        fingerprint = self.metadata.get("model_fingerprint")
        if fingerprint:
            tensors = {f"{path}.weight": materialized_weight(module)}
            check_fingerprint(fingerprint, model, tensors, what=f"statistics of {path}")

    def check_nonsingular(self) -> None:
        """Raise [`SingularStatisticsError`] when the second moment is singular (fewer keys than `d_k`, features that
        are never active, or a non-positive eigenvalue), so that ROME's `C⁻¹` does not exist."""
        if self.count < self.d_k:
            raise SingularStatisticsError(
                f"These statistics come from {self.count} keys, fewer than the width d_k={self.d_k}, so the second "
                f"moment is singular. Compute them from at least {self.d_k} tokens (about "
                f"{RECOMMENDED_TOKENS_PER_DIM * self.d_k} recommended)."
            )
        smallest = float(torch.linalg.eigvalsh(_symmetric(self.mom2.double()))[0])
        if smallest <= 0.0:
            raise SingularStatisticsError(
                f"The second moment at {self.module_path} is singular (smallest eigenvalue {smallest:.3g}): some "
                "directions of the key space never occurred in the corpus. Use more or more varied text, or a "
                "method that does not invert it (MEMIT with a ridge term, AlphaEdit)."
            )

    # ---------------------------------------------------------------------------------------------- AlphaEdit
    def null_space_projector(self, threshold: float = 1e-2, relative: bool = False) -> torch.Tensor:
        """AlphaEdit's projector `P = Û Ûᵀ` onto the (approximate) null space of the preserved keys.

        `Û` holds the eigenvectors of the second moment whose eigenvalues are below `threshold` (Fang et al. 2025,
        "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", eq. 8-9). An update `Δ P` leaves
        `(W + Δ P) k ≈ W k` for the keys `k` of ordinary text.

        Threshold scale: the paper writes the eigendecomposition of `K₀K₀ᵀ`, but the reference implementation
        (`get_project` in jianghoucheng/AlphaEdit) decomposes `get_cov(...)`, which is ROME's
        `SecondMoment.moment()` = `Σ k kᵀ / count`: the normalised second moment, our `mom2`. Its `1e-2` is therefore
        applied to the eigenvalues of `mom2` as they are, with no rescaling by `count` (which would make the
        projector depend on how many tokens were read). With `relative=True`, `threshold` is a fraction of the largest
        eigenvalue instead, which carries over between models whose activations differ in scale.

        The projector is computed in fp64 once per threshold, kept in memory and written by `save_pretrained`.

        Args:
            threshold (`float`, *optional*, defaults to `1e-2`):
                Eigenvalues of `mom2` below this are taken as the null space.
            relative (`bool`, *optional*, defaults to `False`):
                Whether `threshold` is relative to the largest eigenvalue.

        Returns:
            `torch.Tensor`: the `(d_k, d_k)` fp32 projector, symmetric and idempotent.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise StatisticsError(f"threshold must be a non-negative number, got {threshold!r}.")
        key = (float(threshold), bool(relative))
        if key not in self._projectors:
            eigenvalues, eigenvectors = torch.linalg.eigh(_symmetric(self.mom2.double()))
            cutoff = float(threshold) * (float(eigenvalues[-1]) if relative else 1.0)
            basis = eigenvectors[:, eigenvalues < cutoff]
            kept = basis.shape[1]
            if kept == 0:
                logger.warning(
                    "No eigenvalue of the second moment at %s is below %.3g: the null-space projector is zero and "
                    "blocks every update. Raise the threshold.", self.module_path, cutoff,
                )
            elif kept == self.d_k:
                logger.warning(
                    "Every eigenvalue of the second moment at %s is below %.3g: the projector is the identity and "
                    "protects nothing. Lower the threshold.", self.module_path, cutoff,
                )
            logger.info("Null space at %s: %d of %d directions (eigenvalue < %.3g).", self.module_path, kept,
                        self.d_k, cutoff)
            self._projectors[key] = (basis @ basis.T).float()
        return self._projectors[key]

    # --------------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `statistics.safetensors` (mom2, count, computed projectors), `statistics_config.json` and a card,
        atomically: nothing half-written is ever left at `save_directory`."""
        from safetensors.torch import save_file

        tensors = {"mom2": self.mom2.contiguous(), "count": torch.tensor([self.count], dtype=torch.int64)}
        projectors = []
        for index, ((threshold, relative), projector) in enumerate(sorted(self._projectors.items())):
            tensors[f"null_space_projector.{index}"] = projector.contiguous()
            projectors.append({"threshold": threshold, "relative": relative, "tensor": f"null_space_projector.{index}"})
        config = {**self.metadata, "artifact_type": ARTIFACT_TYPE, "count": self.count, "d_k": self.d_k,
                  "dtype": _dtype_name(self.mom2.dtype), "null_space_projectors": projectors}
        with atomic_directory(save_directory) as staging:
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={
                "format": "pt", "hf_knowedit_version": __version__, "artifact_type": ARTIFACT_TYPE,
            })
            write_json(staging / CONFIG_NAME, config)
            (staging / CARD_NAME).write_text(self._card(), encoding="utf-8")

    def _card(self) -> str:
        identity = self.metadata.get("model_fingerprint", {})
        corpus = self.metadata.get("corpus", {})
        header = dump_json({"library_name": "hf-knowedit", "tags": ["knowledge-editing", "hf-knowedit", "rome"]})
        return (
            f"---\n{header.strip()}\n---\n\n# Key statistics of {self.module_path}\n\n"
            f"Uncentred second moment `E[k kᵀ]` of the input of `{self.module_path}` (layer {self.layer}) of "
            f"`{identity.get('name_or_path')}`, from {self.count} tokens of a `{corpus.get('kind')}` corpus "
            f"({corpus.get('path') or corpus.get('builder_name') or corpus.get('type')}), in "
            f"{_dtype_name(self.mom2.dtype)}. Made with hf-knowedit {__version__} for ROME, MEMIT and AlphaEdit:\n\n"
            "```python\nfrom hf_knowedit.statistics import LayerStatistics\n"
            f"stats = LayerStatistics.from_pretrained(\"<repo id or path>\", model=model, layer={self.layer})\n```\n"
        )

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, model=None, layer: int | None = None,
                        **hub_kwargs) -> LayerStatistics:
        """Load statistics saved by [`~LayerStatistics.save_pretrained`] from a directory or a Hub repo.

        Args:
            path_or_repo_id (`str` or `os.PathLike`):
                A local directory or a Hub repo id (resolved with `huggingface_hub.snapshot_download`).
            model (`PreTrainedModel`, *optional*):
                When given, [`~LayerStatistics.check_compatible`] checks the statistics against it.
            layer (`int`, *optional*):
                The layer they must be for; defaults to the layer they record.
            hub_kwargs:
                `subfolder`, `revision`, `token`, `cache_dir`, `local_files_only`.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = resolve_artifact_dir(path_or_repo_id, **hub_kwargs)
        config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_file.is_file() or not weights_file.is_file():
            raise ArtifactError(
                f"{directory} is not a LayerStatistics directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}."
            )
        try:
            metadata = json.loads(config_file.read_text(encoding="utf-8"))
            tensors = load_file(str(weights_file))
        except (json.JSONDecodeError, SafetensorError, OSError, UnicodeDecodeError) as error:
            raise ArtifactError(f"The statistics at {directory} are damaged ({error}); save or download them again.") \
                from error
        if not isinstance(metadata, dict) or metadata.get("artifact_type") != ARTIFACT_TYPE:
            raise ArtifactError(f"{config_file} does not describe hf-knowedit layer statistics.")
        if "mom2" not in tensors or "count" not in tensors:
            raise ArtifactError(f"{weights_file} lacks the tensors 'mom2' and 'count'; save the statistics again.")
        projectors = metadata.pop("null_space_projectors", [])
        try:
            stats = cls(tensors["mom2"], int(tensors["count"].reshape(-1)[0]), metadata)
        except StatisticsError as error:
            raise ArtifactError(f"The statistics at {directory} are invalid: {error}") from error
        if metadata.get("d_k") not in (None, stats.d_k):
            raise ArtifactError(f"{weights_file} holds a {stats.d_k}-wide mom2, but its config says {metadata['d_k']}.")
        for entry in projectors:
            projector = tensors.get(entry.get("tensor"))
            if projector is not None and tuple(projector.shape) == (stats.d_k, stats.d_k):
                stats._projectors[(float(entry["threshold"]), bool(entry.get("relative", False)))] = projector
        if layer is not None and model is None and stats.layer is not None and stats.layer != layer:
            raise BaseModelMismatchError(
                f"The statistics at {directory} are for layer {stats.layer} ({stats.module_path}), not layer {layer}."
            )
        if model is not None:
            stats.check_compatible(model, stats.layer if layer is None else layer)
        return stats

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, revision: str | None = None, create_pr: bool = False):
        """Save to a temporary directory and upload it to the Hub repo `repo_id` (created if needed)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "statistics"
            self.save_pretrained(folder)
            return push_folder_to_hub(
                folder, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                commit_message=commit_message or f"Upload key statistics of {self.module_path} with hf-knowedit",
            )


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


def _too_few_message(what: str, found: int, needed: int) -> str:
    return (
        f"{what} {found} key vectors, but the key space at this layer is {needed} wide: the second moment of fewer "
        f"than {needed} keys is singular. Use at least {needed} tokens, and about "
        f"{RECOMMENDED_TOKENS_PER_DIM * needed} (10 x d_k, Gupta et al. 2025, arXiv 2506.04226) for statistics that "
        "keep editing quality; pass a larger corpus= or num_tokens=."
    )


def _load_cached(directory: Path, key: str) -> LayerStatistics | None:
    if not (directory / CONFIG_NAME).is_file():
        return None
    try:
        stats = LayerStatistics.from_pretrained(directory)
    except (ArtifactError, StatisticsError) as error:
        logger.warning("Ignoring the damaged statistics cache at %s (%s); computing them again.", directory, error)
        return None
    return stats if stats.metadata.get("cache_key") == key else None


# ------------------------------------------------------------------------------------------- in-memory cache
_MEMORY_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[tuple, LayerStatistics]]] = (
    weakref.WeakKeyDictionary()
)


def get_layer_statistics(model, tokenizer, layers, **kwargs) -> dict[int, LayerStatistics]:
    """[`LayerStatistics.compute_many`] behind an in-memory cache, for repeated edits in one process.

    Entries are held per model object (weakly: they go with the model) and keyed by layer, corpus fingerprint and
    the other arguments; an entry is dropped when the module's weight was modified in place since (its tensor
    version changed), and the disk cache, keyed by the weight's digest, decides then.

    Example:

    ```py
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    >>> texts = [f"The {i}th text of the corpus says little." for i in range(300)]
    >>> first = get_layer_statistics(model, tokenizer, [0, 1], corpus=texts, num_tokens=700, use_cache=False,
    ...                              progress=False)
    >>> again = get_layer_statistics(model, tokenizer, [1], corpus=texts, num_tokens=700, use_cache=False,
    ...                              progress=False)
    >>> again[1] is first[1]
    True

    ```
    """
    if isinstance(layers, int):
        layers = [layers]
    corpus = resolve_corpus(kwargs.pop("corpus", None), kwargs.get("text_column", "text"))
    options = {
        "num_tokens": kwargs.get("num_tokens", 100_000),
        "dtype": _dtype_name(kwargs.get("dtype", torch.float32)),
        "max_length": kwargs.get("max_length", 256),
        "text_column": kwargs.get("text_column", "text"),
    }
    layout = resolve_layout(model)
    entries = _MEMORY_CACHE.setdefault(model, {})
    found: dict[int, LayerStatistics] = {}
    tokens = {}
    for layer in layers:
        layout.check_layer(layer, "layer")
        weight = layout.mlp_out(model, layer).weight
        tokens[layer] = (weight.data_ptr(), weight._version, str(weight.dtype))
        key = (layer, corpus.fingerprint, *sorted(options.items()))
        entry = entries.get(key)
        if entry is not None and entry[0] == tokens[layer]:
            found[layer] = entry[1]
    missing = [layer for layer in layers if layer not in found]
    if missing:
        computed = LayerStatistics.compute_many(model, tokenizer, missing, corpus=corpus, **kwargs)
        for layer, stats in computed.items():
            entries[(layer, corpus.fingerprint, *sorted(options.items()))] = (tokens[layer], stats)
            found[layer] = stats
    return {layer: found[layer] for layer in layers}


def clear_statistics_cache() -> None:
    """Forget every statistic held in memory by [`get_layer_statistics`] (the disk cache is left alone)."""
    _MEMORY_CACHE.clear()


__all__ = [
    "CorpusNotFoundError",
    "InsufficientTokensError",
    "LayerStatistics",
    "SingularStatisticsError",
    "StatisticsError",
    "clear_statistics_cache",
    "corpus_identity",
    "detokenize_wikitext",
    "get_layer_statistics",
    "pack_sequences",
    "resolve_corpus",
]
