"""Memory planning: the peak memory of an edit or an evaluation run, estimated before any weight is loaded.

:func:`estimate_peak_memory` reads the model's config (`transformers.AutoConfig`, from local files only), builds the
model on the meta device (`accelerate.init_empty_weights`) to count its parameters and find the modules each method
touches, and adds up what the method holds at each phase of its work, in bytes:

- **weights**: unique parameters (tied embeddings counted once) and buffers, times the dtype's size;
- **activations**: what autograd saves for the backward pass in each block the gradient flows through. The base
  weights are frozen while editing, so a linear layer saves nothing but its (already counted) weight, and a block of a
  Llama-like model saves per token: the two norm inputs, the attention's query, key, value and output (SDPA keeps no
  score matrix), and in its MLP the activation's input plus the two factors of the gated product. Only the blocks
  after the first trained or edited site are in the graph: FT from its tuned layer on, ROME and MEMIT from the layer
  whose value they optimise (the blocks before it run once, without a graph), KN from the first layer of each pass;
- **logits and loss**: `tokens x vocabulary` tensors: the logits, the log-softmax that the loss saves, and the
  gradients the backward pass makes of them (three or four such tensors at the peak, depending on whether the code
  keeps the logits alive); KN's integrated gradients keep the full logits of the `steps` scaled copies of each layer
  of a pass and get a gradient of the same size back;
- **trainable parameters, gradients and optimizer states** of what a method trains (FT's dense change of a weight,
  T-Patcher's patches, CaliNET's slots, GRACE's values): fp32, Adam keeps two states, so four times the parameters;
- **second-moment statistics** (ROME, MEMIT, AlphaEdit): `d_k x d_k` per edited layer in the accumulation dtype,
  and the fp64 copies that the solves, the invertibility check and AlphaEdit's eigendecomposition make;
- **editor networks** (MEND, KE, SERAC): their sizes from their configs (MEND's low-rank MLPs per weight shape, KE's
  LSTM and heads) or, for a trained editor on disk, from its safetensors header; loading a trained editor holds the
  loaded tensors and the built network at once.

The peak is the largest of the phases' totals; :class:`MemoryPlan` keeps the breakdown of that phase and the total
of every phase. How long the prompts are decides the activations and logits: by default a request of 16 prompt
tokens and 4 target tokens (:class:`RequestShape`); pass `requests` (with a tokenizer, or for a local model whose
tokenizer loads from its files) to plan for real requests. On fp16/bf16 models the plan adds what `add_edits` does
there besides (the fp32 copies of fingerprinting, the scoring of the precision check). With `mode="evaluate"` it adds
the scoring before and after the edit that `hf-knowedit evaluate` does: with `requests`, the scorer's batches of those
cases are replayed (its order and padding); without, full batches of the longest probe are assumed.

`benchmarks/bench_plan.py` compares the estimates with the measured peaks (:func:`hf_knowedit.memory.track_memory`)
of every method on the default model.

Example:

```python
>>> from hf_knowedit.plan import RequestShape, estimate_peak_memory
>>> from tests.tiny_models import tiny_model
>>> shape = RequestShape(prompt_tokens=10, target_tokens=2)
>>> plan = estimate_peak_memory("ft", tiny_model("llama"), request_shape=shape)
>>> plan.peak_phase, sorted(plan.components)
('fine-tuning step (backward)', ['activations', 'gradients', 'logits and loss', 'optimizer states', \
'trainable parameters', 'weights'])
>>> plan.total_bytes == sum(plan.components.values())
True

```
"""

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import EditConfig, build_config, get_config_class
from .errors import ArtifactError, EditConfigError


MODES = ("edit", "evaluate")
DEVICES = ("cpu", "cuda")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HALF_DTYPES = ("bfloat16", "float16")
FP32, FP64 = 4, 8
# Python-level activations of transformers (`ACT2FN`) that autograd records as several elementwise ops: how many
# `intermediate`-sized tensors each saves; a fused torch activation (relu, gelu, silu, ...) saves only its input.
_ACTIVATION_SAVED = {"gelu_new": 4, "gelu_fast": 4, "gelu_python": 3, "quick_gelu": 2, "gelu_accurate": 4}
_ACTIVATION_KEYS = ("hidden_act", "activation_function", "hidden_activation", "feed_forward_proj")
# T-Patcher's built-in out-of-scope prompts, when no tokenizer is at hand to count their tokens.
_DEFAULT_MEMORY_PROMPT_TOKENS = 9
_STATISTICS_BATCH_TOKENS = 4096  # LayerStatistics.compute's default `batch_tokens`
DEFAULT_SCORER_BATCH_SIZE = 32  # hf-knowedit evaluate's default `--scorer-batch-size`
DEFAULT_FLUENCY_TOKENS = 50  # and `--fluency-tokens`


# -- what the plan is made from ----------------------------------------------------------------------------------
@dataclass
class RequestShape:
    """The token counts of one edit request, which decide the sizes of activations and logits.

    Args:
        prompt_tokens (`int`, *optional*, defaults to `16`): the filled-in edit prompt.
        target_tokens (`int`, *optional*, defaults to `4`): the new target after the prompt.
        subject_tokens (`int`, *optional*, defaults to `4`): the subject (ROME's "{subject} is a" prompts).
        rephrase_tokens (`list[int]`, *optional*, defaults to `[]`): each rephrased prompt (KN attributes them too;
            evaluation scores them).
        locality_tokens (`list[int]`, *optional*, defaults to `[]`): each locality prompt.
    """

    prompt_tokens: int = 16
    target_tokens: int = 4
    subject_tokens: int = 4
    rephrase_tokens: list[int] = field(default_factory=list)
    locality_tokens: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("prompt_tokens", "target_tokens", "subject_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EditConfigError(f"RequestShape.{name} must be a positive number of tokens, got {value!r}.")
        for name in ("rephrase_tokens", "locality_tokens"):
            values = list(getattr(self, name))
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise EditConfigError(f"RequestShape.{name} must hold positive numbers of tokens, got {values!r}.")
            setattr(self, name, values)

    @property
    def longest_prompt(self) -> int:
        """The longest of the edit prompt and its rephrases."""
        return max([self.prompt_tokens, *self.rephrase_tokens])

    @classmethod
    def from_request(cls, request, tokenizer) -> "RequestShape":
        """The token counts of an :class:`~hf_knowedit.EditRequest` under `tokenizer` (as the methods tokenise)."""
        from .tokenization import split_prompt_target

        prompt_ids, target_ids = split_prompt_target(tokenizer, request.filled_prompt, request.target_new)

        def count(text: str) -> int:
            return max(1, len(tokenizer(text)["input_ids"]))

        return cls(
            prompt_tokens=max(1, len(prompt_ids)),
            target_tokens=max(1, len(target_ids)),
            subject_tokens=count(request.subject),
            rephrase_tokens=[count(p) for p in request.rephrase_prompts],
            locality_tokens=[count(p.prompt) for p in request.locality],
        )


@dataclass
class ModelSpec:
    """The sizes of a model that memory depends on, read from its config and its structure on the meta device."""

    name: str
    model_type: str
    num_parameters: int
    num_buffer_elements: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_gated: bool
    activation: str
    rms_norm: bool
    attn_implementation: str
    is_encoder_decoder: bool
    layout: Any = field(repr=False)
    linear_shapes: dict[str, tuple[int, int]] = field(repr=False, default_factory=dict)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def shape(self, path: str) -> tuple[int, int]:
        """`(out, in)` of the linear module at `path`."""
        return self.linear_shapes[path]


@dataclass
class MemoryPlan:
    """The estimated peak memory of a run, with its breakdown.

    Args:
        method (`str`): the editing method.
        model (`str`): the model's name.
        dtype (`str`), device (`str`), mode (`str`), batch_size (`int`): the run planned.
        components (`dict[str, int]`): bytes per component at the peak (they add up to `total_bytes`).
        peak_phase (`str`): the phase of the run where the peak is.
        phases (`dict[str, int]`): the total bytes of every phase, in the order the run goes through them.
        assumptions (`dict`): what the estimate assumed (token counts, layers, statistics cached, ...).
        notes (`list[str]`): what the estimate leaves out or could not know.
    """

    method: str
    model: str
    dtype: str
    device: str
    mode: str
    batch_size: int
    components: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    assumptions: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """The estimated peak: the sum of the components of the peak phase."""
        return sum(self.components.values())

    @property
    def working_bytes(self) -> int:
        """The peak beyond the model's weights: what the run itself needs."""
        return self.total_bytes - self.components.get("weights", 0)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(total_bytes=self.total_bytes, working_bytes=self.working_bytes)
        return data

    def table(self) -> str:
        """A readable table of the breakdown, the phases and the assumptions."""
        peak_label = f"peak ({self.peak_phase})"
        width = max([len(k) for k in [*self.components, *self.phases, peak_label]] + [28])
        lines = [
            f"Memory plan: {self.method} on {self.model} ({self.dtype}, {self.device}, {self.mode}, "
            f"batch of {self.batch_size})",
            "",
            f"{'component':<{width}} {'bytes':>15} {'MiB':>10}",
        ]
        for name, size in self.components.items():
            lines.append(f"{name:<{width}} {size:>15,} {size / 2**20:>10.1f}")
        lines.append(f"{peak_label:<{width}} {self.total_bytes:>15,} "
                     f"{self.total_bytes / 2**20:>10.1f}")
        lines += ["", f"{'phase':<{width}} {'bytes':>15} {'MiB':>10}"]
        for name, size in self.phases.items():
            marker = "  <- peak" if name == self.peak_phase else ""
            lines.append(f"{name:<{width}} {size:>15,} {size / 2**20:>10.1f}{marker}")
        if self.assumptions:
            lines += ["", "assumed: " + "; ".join(f"{k}={_short(v)}" for k, v in self.assumptions.items())]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass
class Phase:
    """What a run holds at one point: `{component: bytes}`."""

    name: str
    components: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.components.values())


# -- reading the model without its weights --------------------------------------------------------------------------
def read_model_spec(model: "str | os.PathLike | nn.Module | Any" = "default") -> ModelSpec:
    """The :class:`ModelSpec` of a model id or path (local files only), `"default"`, a config or a model.

    A model id is read from the local Hugging Face cache only (nothing is downloaded); the embedded default model is
    read from its cached conversion, or from the header of its GGUF file when it was never converted.
    """
    from transformers import PretrainedConfig

    if isinstance(model, nn.Module):
        return _spec_from_module(model, _model_name(getattr(model, "config", None)))
    if isinstance(model, PretrainedConfig):
        config = model
    else:
        config = _read_config(str(model))
    fallback = str(model) if isinstance(model, (str, os.PathLike)) else None
    return _spec_from_module(_meta_model(config), _model_name(config, fallback))


def _read_config(name: str):
    from transformers import AutoConfig

    from .modeling import (
        CACHE_MARKER,
        DEFAULT_MODEL_ALIASES,
        DEFAULT_MODEL_NAME,
        default_model_cache_dir,
        default_model_gguf,
    )

    if name in DEFAULT_MODEL_ALIASES and not Path(name).exists():
        cached = default_model_cache_dir()
        if (cached / CACHE_MARKER).is_file() and (cached / "config.json").is_file():
            config = AutoConfig.from_pretrained(cached, local_files_only=True)
        else:
            gguf = default_model_gguf()  # ArtifactError when the package is missing
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config._name_or_path = f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"
        return config
    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ArtifactError(f"{path} holds no config.json: it is not a transformers model folder.")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name, local_files_only=True)
    except (OSError, ValueError):
        raise ArtifactError(
            f"The model {name!r} was not found locally: there is no folder of that name, and its config is not in "
            "the Hugging Face cache. Planning reads configs from local files only; download the model's config first "
            f"(`hf download {name} config.json`), or give a local path."
        ) from None


def _meta_model(config) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with init_empty_weights(include_buffers=True):
            return auto.from_config(config)
    except (ValueError, KeyError) as error:
        raise ArtifactError(f"Cannot build a {getattr(config, 'model_type', '?')} model from its config: {error}") \
            from None


def _model_name(config, fallback: str | None = None) -> str:
    name = getattr(config, "_name_or_path", None) or fallback or getattr(config, "model_type", None) or "model"
    return str(name)


def _spec_from_module(model: nn.Module, name: str) -> ModelSpec:
    from .architectures import linear_shape, resolve_layout

    layout = resolve_layout(model)
    config = model.config
    text = getattr(config, "text_config", None) or config
    if layout.is_encoder_decoder:
        text = getattr(config, "decoder", None) or text
    shapes = {}
    for path, module in model.named_modules():
        try:
            shapes[path] = linear_shape(module)
        except TypeError:
            continue
    d_v, d_k = shapes[layout.mlp_out_path(0)]
    mlp_in_out = sum(shapes[p][0] for p in layout.mlp_in_paths(0))
    num_heads = _first_int(text, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")) or 1
    num_kv_heads = _first_int(text, ("num_key_value_heads", "multi_query_group_num", "n_head_kv")) or num_heads
    head_dim = _first_int(text, ("head_dim", "d_kv")) or d_v // num_heads
    activation = next((str(getattr(text, k)) for k in _ACTIVATION_KEYS if isinstance(getattr(text, k, None), str)),
                      "")
    vocab = layout.lm_head(model).weight.shape[0] if hasattr(layout.lm_head(model), "weight") else text.vocab_size
    return ModelSpec(
        name=name,
        model_type=layout.model_type,
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_buffer_elements=sum(b.numel() for b in model.buffers()),
        num_layers=layout.num_layers,
        hidden_size=d_v,
        intermediate_size=d_k,
        vocab_size=int(vocab),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        mlp_gated=mlp_in_out >= 2 * d_k,
        activation=activation.lower(),
        rms_norm=any("rmsnorm" in type(m).__name__.lower() for m in model.modules()),
        attn_implementation=str(getattr(config, "_attn_implementation", None) or "sdpa"),
        is_encoder_decoder=layout.is_encoder_decoder,
        layout=layout,
        linear_shapes=shapes,
    )


def _first_int(config, keys) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# -- the sizes every method is built from ----------------------------------------------------------------------------
class _Sizes:
    """Bytes of the tensors a method makes, for one model at one dtype."""

    def __init__(self, spec: ModelSpec, dtype_bytes: int):
        self.spec, self.b = spec, dtype_bytes

    @property
    def weights(self) -> int:
        buffers = self.spec.num_buffer_elements * FP32  # rotary frequencies and the like stay in fp32
        return self.spec.num_parameters * self.b + buffers

    def block_saved(self, tokens: int, sequence: int, padded: bool = False) -> int:
        """What one block saves for backward, for `tokens` tokens in sequences of `sequence` (weights frozen).

        `padded`: the batch has padding, so the attention gets a mask: SDPA then saves the block's own copy of it
        (converted to the dtype) and keys and values repeated to every query head (grouped-query attention without
        repetition needs a mask-free call).
        """
        s, b = self.spec, self.b
        norm_bytes = FP32 if s.rms_norm else b  # RMSNorm upcasts its input to fp32 and saves that
        per_token = 2 * s.hidden_size * norm_bytes + 2 * FP32  # the norms' inputs and their 1/rms (or mean, rstd)
        kv_dim = s.q_dim if padded else s.kv_dim
        per_token += (2 * s.q_dim + 2 * kv_dim) * b + s.num_heads * FP32  # q, k, v, output, log-sum-exp
        if padded:
            per_token += sequence * b
        if s.attn_implementation == "eager":  # the score matrix, after softmax, twice (fp32 softmax, its cast)
            per_token += s.num_heads * sequence * (FP32 + b)
        per_token += self.mlp_saved_multiple * s.intermediate_size * b
        return tokens * per_token

    @property
    def mlp_saved_multiple(self) -> int:
        s = self.spec
        activation = _ACTIVATION_SAVED.get(s.activation, 1)
        return activation + 2 if s.mlp_gated else activation  # gated: the two factors of the product too

    def blocks_saved(self, num_blocks: int, tokens: int, sequence: int, padded: bool = False) -> int:
        return max(0, num_blocks) * self.block_saved(tokens, sequence, padded)

    def block_forward(self, tokens: int) -> int:
        """The temporaries of one block's forward pass without a graph (the MLP's product and its factors)."""
        s = self.spec
        return tokens * self.b * (3 * s.intermediate_size + 3 * s.hidden_size)

    def kv_cache(self, tokens: int, layers: int | None = None) -> int:
        """The key-value cache a forward pass builds when it is not called with `use_cache=False` (the model
        config's default): keys and values of `layers` blocks (default: all). It lives with the model's output, so
        it counts where the logits are made, not in a backward pass or a loss computed from the logits alone."""
        layers = self.spec.num_layers if layers is None else layers
        return 2 * max(0, layers) * tokens * self.spec.kv_dim * self.b

    def full_forward(self, tokens: int, cache: bool = True) -> dict[str, int]:
        """A forward pass without a graph that returns the logits of all `tokens`: the logits, the key-value cache,
        and the blocks' temporaries when they outweigh the logits (they are gone by the time the logits exist)."""
        logits, temporaries = self.logits(tokens), self.block_forward(tokens)
        return {"logits": logits, "kv_cache": self.kv_cache(tokens) if cache else 0,
                "forward_temporaries": temporaries if temporaries > logits else 0}

    def logits(self, rows: int) -> int:
        return rows * self.spec.vocab_size * self.b

    def logits32(self, rows: int) -> int:
        return rows * self.spec.vocab_size * FP32

    def upcast(self, rows: int) -> int:
        """The fp32 copy of `rows` logits that `.float()` makes when the model is not in fp32."""
        return 0 if self.b == FP32 else self.logits32(rows)

    def loss_head(self, rows: int, logits_held: bool) -> int:
        """Peak of the target log-likelihood's backward (`PromptTargetBatch.target_log_probs`): the saved
        log-softmax, its incoming gradient and its input gradient, `(rows, vocab)` in fp32, and the logits when the
        caller keeps them."""
        return 3 * self.logits32(rows) + (self.logits(rows) if logits_held else 0)

    def fingerprint_copy(self, numel: int) -> int:
        """Fingerprinting a weight (`hf_knowedit.fingerprint.tensor_digest`) takes its fp32 norm: a copy unless the
        model is in fp32. (Its SHA-256 reads a `bytes` copy of the weight too, which is not tensor memory.)"""
        return 0 if self.b == FP32 else numel * FP32

    def scoring_head(self, tokens: int) -> int:
        """Peak of `BatchScorer.score_targets` on `tokens` tokens: the logits, the aligned copy read for the argmax
        (fp32), and `target_log_probs`' own aligned copy and log-softmax."""
        return self.logits(tokens) + 2 * max(self.logits(tokens), self.logits32(tokens)) + self.logits32(tokens)

    def hidden(self, tokens: int, dtype_bytes: int | None = None) -> int:
        return tokens * self.spec.hidden_size * (dtype_bytes or self.b)


@dataclass
class _Context:
    method: str
    config: EditConfig
    spec: ModelSpec
    sizes: _Sizes
    shapes: list[RequestShape]
    mode: str
    statistics_cached: bool | None
    tokenizer: Any
    assumptions: dict[str, Any]
    notes: list[str]
    all_shapes: list[RequestShape] = field(default_factory=list)  # every request given (evaluation scores them)
    requests: list = field(default_factory=list)  # the requests themselves, when given

    @property
    def num_requests(self) -> int:
        return len(self.shapes)

    def edit_lengths(self, shapes=None) -> list[int]:
        """The tokens of each request's prompt-and-target row where the edited blocks see them (for an
        encoder-decoder, the decoder's: the target)."""
        if self.spec.is_encoder_decoder:
            return [s.target_tokens for s in (shapes or self.shapes)]
        return [s.prompt_tokens + s.target_tokens for s in (shapes or self.shapes)]

    def weights_phase(self, name: str, **components: int) -> Phase:
        """A phase holding the weights plus `components` (underscores in names become spaces; zeros dropped)."""
        parts = {"weights": self.sizes.weights}
        parts.update({k.replace("_", " "): int(v) for k, v in components.items() if v})
        return Phase(name, parts)


Planner = Callable[[_Context], list[Phase]]
MEMORY_PLANNERS: dict[str, Planner] = {}


def register_memory_planner(method: str, planner: Planner) -> None:
    """Give the method `method` a memory planner: `planner(context) -> [Phase, ...]` (see the built-in ones)."""
    MEMORY_PLANNERS[method] = planner


def _planner(method: str):
    def decorate(function: Planner) -> Planner:
        register_memory_planner(method, function)
        return function

    return decorate


# -- the methods --------------------------------------------------------------------------------------------------
def _dense_training(numel: int) -> dict[str, int]:
    """A trained fp32 tensor with Adam: the parameter, its gradient and two optimizer states."""
    return {"trainable_parameters": numel * FP32, "gradients": numel * FP32, "optimizer_states": 2 * numel * FP32}


@_planner("ft")
def _plan_ft(ctx: _Context) -> list[Phase]:
    config, spec, sizes = ctx.config, ctx.spec, ctx.sizes
    layout = spec.layout
    layers = config.resolve_layers(layout)
    paths = []
    for layer in layers:
        if config.target_module == "mlp_out":
            paths.append(layout.mlp_out_path(layer))
        elif config.target_module == "mlp_in":
            paths.extend(layout.mlp_in_paths(layer))
        else:
            paths.append(layout.attn_out_path(layer))
    numel = sum(spec.shape(p)[0] * spec.shape(p)[1] for p in paths)
    batch = ctx.shapes[: config.batch_size]
    sequence = max(ctx.edit_lengths(batch))
    tokens = len(batch) * sequence
    first = min(layers)
    # The delta's input is saved for its gradient; its own block's rest and every later block are in the graph.
    site_input = {"mlp_out": spec.intermediate_size, "mlp_in": spec.hidden_size, "attn_out": spec.q_dim}
    saved = tokens * site_input[config.target_module] * FP32
    if config.target_module == "mlp_out":
        saved += sizes.blocks_saved(spec.num_layers - first - 1, tokens, sequence, padded=len(batch) > 1)
    else:
        saved += sizes.blocks_saved(spec.num_layers - first, tokens, sequence, padded=len(batch) > 1)
    head = sizes.loss_head(tokens, logits_held=True)
    if config.objective == "prompt_last":  # one position per row is read; the logits stay, the rest is small
        head = sizes.logits(tokens) + sizes.upcast(tokens) + 3 * sizes.logits32(len(batch))
    training = _dense_training(numel)
    ctx.assumptions.update(ft_layers=layers, ft_tokens_per_batch=tokens)
    return [
        ctx.weights_phase("fine-tuning step (backward)", **training, activations=saved, logits_and_loss=head),
        ctx.weights_phase("frozen copy of the change", **training, edit_components=numel * FP32),
    ]


# ROME, MEMIT and AlphaEdit: keys, values, statistics, solves -------------------------------------------------------
def _mom2_bytes(config) -> int:
    return {"float64": FP64, "float32": FP32, "float16": 2, "bfloat16": 2}[config.mom2_dtype]


def _statistics_phases(ctx: _Context, layers: list[int]) -> tuple[int, list[Phase]]:
    """Bytes of the statistics held while editing, and the phase that computes them when they are not cached."""
    config, spec, sizes = ctx.config, ctx.spec, ctx.sizes
    d_k = spec.intermediate_size
    # LayerStatistics accumulates in fp32 or fp64 only (fp16 and bf16 requests accumulate in fp32).
    acc = max(FP32, _mom2_bytes(config))
    held = len(layers) * d_k * d_k * acc
    cached = ctx.statistics_cached
    if cached is None:
        cached = config.stats_dir is not None or _statistics_on_disk(ctx, layers)
    ctx.assumptions["statistics_cached"] = cached
    if cached:
        return held, []
    tokens = min(_STATISTICS_BATCH_TOKENS, config.mom2_num_tokens)
    compute = ctx.weights_phase(
        "second-moment statistics (computed)", statistics=held,
        forward_temporaries=sizes.block_forward(tokens) + sizes.hidden(tokens),
        statistics_keys=tokens * d_k * acc,
    )
    return held, [compute]


def _statistics_on_disk(ctx: _Context, layers: list[int]) -> bool:
    """Whether the statistics cache holds a directory for each layer (matched by name: no weights are read)."""
    import re

    from .statistics import stats_cache_root

    name = re.sub(r"[^A-Za-z0-9_.-]+", "--", ctx.spec.name or "model").strip("-.") or "model"
    root = stats_cache_root() / name
    dtype = "float64" if ctx.config.mom2_dtype == "float64" else "float32"
    for layer in layers:
        prefix = f"{ctx.spec.layout.mlp_out_path(layer)}-{dtype}-{ctx.config.mom2_num_tokens}tok-"
        if not root.is_dir() or not any(p.name.startswith(prefix) for p in root.iterdir()):
            return False
    return True


def _prefix_tokens(config) -> int:
    """Tokens of the longest context prefix: the start word, the generated tokens and the '. ' separator."""
    return config.context_prefix_length + 2 if config.num_context_prefixes else 0


def _value_phases(ctx: _Context, chunk: list[RequestShape], layer: int, held: dict[str, int]) -> list[Phase]:
    """The target-value optimisation of ROME Eq. 4 / MEMIT Eq. 16 at `layer` for one chunk of requests."""
    config, spec, sizes = ctx.config, ctx.spec, ctx.sizes
    texts_per_request = config.num_context_prefixes + 1
    rewrite_texts = len(chunk) * texts_per_request
    texts = rewrite_texts + len(chunk)  # and one "{subject} is a" text per request
    sequence = max(ctx.edit_lengths(chunk)) + _prefix_tokens(config)
    sequence = max(sequence, max(s.subject_tokens + 2 + s.target_tokens for s in chunk))
    tokens = texts * sequence
    rows = texts_per_request * sum(s.target_tokens for s in chunk) + len(chunk)  # predicting positions, KL positions
    captured = sizes.hidden(tokens)  # the residual stream entering the first recomputed block
    initial = sizes.logits32(rows)  # the logits of the first pass (the KL reference)
    ctx.assumptions.setdefault("value_batch", f"{texts} texts x {sequence} tokens")
    forward = sizes.full_forward(tokens, cache=False)
    forward["logits"] += sizes.upcast(rows) + initial
    first_pass = ctx.weights_phase("target values: first full pass", **held, captured_hidden=captured, **forward)
    # Each step keeps the previous step's logits and log-softmaxes until the new ones replace them.
    head = sizes.logits32(rows) * 2 + 3 * sizes.logits32(rows)
    optimise = ctx.weights_phase(
        "target values: optimisation step", **held, captured_hidden=captured, logits_and_loss=head + initial,
        activations=sizes.blocks_saved(spec.num_layers - layer - 1, tokens, sequence, padded=True)
        + sizes.hidden(tokens),
    )
    return [first_pass, optimise]


def _keys_phase(ctx: _Context, chunk: list[RequestShape], held: dict[str, int], name: str = "subject keys") -> Phase:
    config, sizes = ctx.config, ctx.sizes
    texts = min(config.keys_batch_size, len(chunk) * (config.num_context_prefixes + 1))
    sequence = max(s.prompt_tokens for s in chunk) + _prefix_tokens(config)
    return ctx.weights_phase(name, **held, forward_temporaries=sizes.block_forward(texts * sequence)
                             + sizes.hidden(texts * sequence))


def _prefixes_phase(ctx: _Context) -> Phase:
    """Generating the context prefixes: short greedy generations, one at a time."""
    config, spec, sizes = ctx.config, ctx.spec, ctx.sizes
    length = config.context_prefix_length + 1
    cache = 2 * spec.num_layers * length * spec.kv_dim * sizes.b
    return ctx.weights_phase("context prefixes", kv_cache=cache, logits=2 * sizes.logits32(1),
                             forward_temporaries=sizes.block_forward(length))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


@_planner("rome")
def _plan_rome(ctx: _Context) -> list[Phase]:
    config, spec = ctx.config, ctx.spec
    (layer,) = config.resolve_layers(spec.layout)
    d_k = spec.intermediate_size
    phases = [_prefixes_phase(ctx)]
    held: dict[str, int] = {}
    if config.mom2_adjustment:
        statistics, compute = _statistics_phases(ctx, [layer])
        phases += compute
        held["statistics"] = statistics
        # check_nonsingular: eigvalsh of the symmetrised fp64 copy (the copy, the symmetrised matrix, LAPACK's own).
        phases.append(ctx.weights_phase("statistics: invertibility check", **held,
                                        statistics_fp64_copies=3 * d_k * d_k * FP64))
    # Requests are edited one after the other, each on top of the rank-one updates of the previous ones: the longest
    # request decides the peak.
    longest = max(ctx.shapes, key=lambda s: s.prompt_tokens + s.target_tokens)
    rank_one = (spec.hidden_size + d_k) * FP32
    current = {**held, "edit_components": (ctx.num_requests - 1) * rank_one}
    phases.append(_keys_phase(ctx, [longest], current))
    phases += _value_phases(ctx, [longest], layer, current)
    update = ctx.num_requests * rank_one
    solve = 2 * d_k * d_k * FP64 if config.mom2_adjustment else 0  # C in fp64 and its LU factors
    phases.append(ctx.weights_phase("rank-one solve (Eq. 2)", **held, statistics_fp64_copies=solve,
                                    edit_components=update))
    ctx.assumptions["rome_layer"] = layer
    return phases


def _plan_spread(ctx: _Context, null_space: bool) -> list[Phase]:
    config, spec = ctx.config, ctx.spec
    layers = config.resolve_layers(spec.layout)
    d_k, d_v = spec.intermediate_size, spec.hidden_size
    phases = [_prefixes_phase(ctx)]
    held: dict[str, int] = {}
    if config.mom2_adjustment or null_space:
        statistics, compute = _statistics_phases(ctx, layers)
        phases += compute
        held["statistics"] = statistics
    for chunk in _chunks(ctx.shapes, config.values_batch_size)[:1]:  # chunks are alike; the first is the largest
        phases += _value_phases(ctx, chunk, layers[-1], held)
    phases.append(_keys_phase(ctx, ctx.shapes, held))
    rank = ctx.num_requests
    for position, _ in enumerate(layers):
        updates = position * rank * (d_k + d_v) * FP32
        if null_space:
            # AlphaEdit: the projector of each layer is made by an fp64 eigendecomposition and kept (fp32).
            projectors = position * d_k * d_k * FP32
            phases.append(ctx.weights_phase(
                f"null-space projector (layer {position + 1} of {len(layers)})", **held, projectors=projectors,
                edit_components=updates, eigendecomposition_fp64=4 * d_k * d_k * FP64))
            phases.append(ctx.weights_phase(
                f"null-space solve, Eq. 12 (layer {position + 1} of {len(layers)})", **held,
                projectors=projectors + d_k * d_k * FP32, edit_components=updates,
                solve_fp64=5 * d_k * d_k * FP64))
        else:
            solve = 3 * d_k * d_k * FP64 if config.mom2_adjustment else 2 * d_k * d_k * FP64
            phases.append(ctx.weights_phase(f"batch solve, Eq. 14 (layer {position + 1} of {len(layers)})", **held,
                                            edit_components=updates, solve_fp64=solve))
    ctx.assumptions["layers"] = layers
    return phases


@_planner("memit")
def _plan_memit(ctx: _Context) -> list[Phase]:
    return _plan_spread(ctx, null_space=False)


@_planner("alphaedit")
def _plan_alphaedit(ctx: _Context) -> list[Phase]:
    return _plan_spread(ctx, null_space=True)


@_planner("kn")
def _plan_kn(ctx: _Context) -> list[Phase]:
    config, spec, sizes = ctx.config, ctx.spec, ctx.sizes
    layers = config.resolve_layers(spec.layout)
    steps = config.steps
    # The position that predicts the answer: the prompt's last token (an encoder-decoder's first decoder position).
    longest = 1 if spec.is_encoder_decoder else max(s.longest_prompt for s in ctx.shapes)
    # lm_head.weight.float(): a copy unless the model is in fp32
    embedding = spec.vocab_size * spec.hidden_size * FP32 if sizes.b != FP32 else 0
    attributions = len(layers) * spec.intermediate_size * FP32 * (1 + max(len(s.rephrase_tokens) for s in ctx.shapes))
    held = {"output_embedding_fp32": embedding, "attributions": attributions}
    # Integrated gradients of the first pass (the lowest layers: the most blocks in the graph): `steps` scaled copies
    # of each of its layers in one batch, every block from its first layer on in the graph for the whole batch. A
    # decoder-only prompt of several tokens shares its prefix's key/value cache (expanded to the copies), so each copy
    # runs its last token alone. Each hooked layer clones the batch's activations to scale its rows. The logits'
    # gradient is as large as the full logits; in fp32 the logits themselves stay alive too (the probability is read
    # through a view of them), in half precision `.float()` copies the read position instead.
    group = layers[: config.layers_per_pass or len(layers)]
    first = min(group)
    copies = steps * len(group)
    cached = not spec.is_encoder_decoder and longest > 1
    tokens = copies if cached else copies * longest
    full_logits = (2 if sizes.b == FP32 else 1) * sizes.logits(tokens)
    ig = ctx.weights_phase(
        f"integrated gradients ({len(group)} layers from {first}, {steps} steps each)", **held,
        activations=sizes.blocks_saved(spec.num_layers - first - 1, tokens, 1 if cached else longest)
        + sizes.hidden(tokens) + len(group) * tokens * spec.intermediate_size * sizes.b,
        kv_cache=sizes.kv_cache(copies * (longest - 1)) if cached else 0,
        logits_and_loss=full_logits + sizes.upcast(copies) + 2 * sizes.logits32(copies),
    )
    probe = ctx.weights_phase("neuron activations", **held, **sizes.full_forward(longest))
    ctx.assumptions.update(kn_layers=f"{min(layers)}..{max(layers)}" if len(layers) > 1 else layers,
                           kn_layers_per_pass=len(group),
                           kn_attributed_tokens=f"{copies} x {1 if cached else longest}",
                           kn_prefix_cache=cached)
    return [probe, ig]


# MEND and KE: a trained network reads the edit's gradient -----------------------------------------------------------
def _editor_state_bytes(ctx: _Context) -> int | None:
    """The bytes of a trained editor's tensors on disk, from its safetensors header (no tensor is read)."""
    from .training.artifact import EDITOR_WEIGHTS_NAME, FINAL_SUBFOLDER, UNTRAINED

    source = getattr(ctx.config, "editor", None)
    if source in (None, UNTRAINED):
        return None
    directory = Path(source).expanduser()
    for candidate in (directory, directory / FINAL_SUBFOLDER):
        weights = candidate / EDITOR_WEIGHTS_NAME
        if weights.is_file():
            return _safetensors_bytes(weights)
    ctx.notes.append(f"The editor {source!r} was not found locally; its size is computed from the config.")
    return None


def _safetensors_bytes(path: Path) -> int:
    """The bytes of the tensors of a safetensors file, from its header."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        return sum(end - start for key, value in header.items() if key != "__metadata__"
                   for start, end in [value["data_offsets"]])
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise ArtifactError(f"{path} is not a readable safetensors file; save the editor again.") from None


def _trained_config(ctx: _Context):
    """The config a trained editor was trained with (its network sizes and layers), or the given config."""
    from .training.artifact import EDITOR_CONFIG_NAME, FINAL_SUBFOLDER

    source = getattr(ctx.config, "editor", None)
    if not source:
        return ctx.config
    directory = Path(source).expanduser()
    for candidate in (directory, directory / FINAL_SUBFOLDER):
        file = candidate / EDITOR_CONFIG_NAME
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
                return get_config_class(ctx.method).from_dict(dict(data["config"]))
            except (KeyError, ValueError, TypeError, json.JSONDecodeError):
                raise ArtifactError(f"{file} is not a readable trained-editor config.") from None
    return ctx.config


def _editor_layers(ctx: _Context, config) -> list[int]:
    if config.layers is None and ctx.config.layers is not None:
        return list(ctx.config.layers)
    return config.resolve_layers(ctx.spec.layout)


def _mend_network_bytes(config, shapes: list[tuple[int, int]]) -> int:
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    total = len(shapes)  # the step sizes
    for (out_features, in_features), modes in counts.items():
        width = in_features + out_features
        rank = min(config.rank, width)
        per_layer = 2 * rank * width + width + 2 * modes * width
        total += (config.num_hidden + 1) * per_layer + 2 * width + 2 * (FP64 // FP32)  # running moments
    return total * FP32


def _ke_network_bytes(config, shapes: list[tuple[int, int]], embedding_size: int) -> int:
    h = config.condition_size
    lstm = 2 * (4 * h * (embedding_size + h) + 8 * h)
    project = 2 * h * 2 * h + 2 * h
    heads = sum(2 * (2 * h + 1) * out + 2 * (2 * h + 1) * inp + 2 * h + 1 for out, inp in shapes)
    return (lstm + project + heads) * FP32


def _gradient_editor_phases(ctx: _Context, network_bytes: Callable[[Any, list], int]) -> list[Phase]:
    from .training.gradients import GRADIENT_CHUNK, mlp_module_paths

    spec, sizes = ctx.spec, ctx.sizes
    trained = _trained_config(ctx)
    layers = _editor_layers(ctx, trained)
    paths = mlp_module_paths(spec.layout, layers, ctx.config.target_modules)
    shapes = [spec.shape(p) for p in paths]
    network = network_bytes(trained, shapes)
    on_disk = _editor_state_bytes(ctx)
    loading = on_disk if on_disk is not None else 0
    # A trained editor is checked against the base model: the weights it edits are fingerprinted, one at a time.
    check = sizes.fingerprint_copy(max(o * i for o, i in shapes)) if on_disk is not None else 0
    phases = [ctx.weights_phase("editor network: loading", editor_network=network, editor_tensors_read=loading,
                                fingerprint_copy=check)]
    sequence = max(ctx.edit_lengths())
    tokens = ctx.num_requests * sequence
    first = min(layers)
    in_graph = spec.num_layers - first - (1 if ctx.config.target_modules == "mlp_out" else 0)
    captured = sum(tokens * (inp + out) * sizes.b for out, inp in shapes)
    factors = sum(tokens * (inp + out) * FP32 for out, inp in shapes)
    chunk = min(ctx.num_requests, GRADIENT_CHUNK) * sequence  # one forward and backward per chunk of requests
    phases.append(ctx.weights_phase(
        "gradient of the edit loss", editor_network=network, captured_inputs_and_outputs=captured,
        activations=sizes.blocks_saved(in_graph, chunk, sequence, padded=ctx.num_requests > 1)
        + sizes.hidden(chunk),
        logits_and_loss=sizes.loss_head(chunk, logits_held=True),
    ))
    phases.append(ctx.weights_phase("editor network: update factors", editor_network=network,
                                    captured_inputs_and_outputs=captured, gradient_factors=2 * factors))
    ctx.assumptions.update(edited_layers=layers, editor="on disk" if on_disk is not None else "from its config")
    return phases


@_planner("mend")
def _plan_mend(ctx: _Context) -> list[Phase]:
    return _gradient_editor_phases(ctx, _mend_network_bytes)


@_planner("ke")
def _plan_ke(ctx: _Context) -> list[Phase]:
    return _gradient_editor_phases(ctx, lambda config, shapes: _ke_network_bytes(config, shapes, ctx.spec.hidden_size))


@_planner("serac")
def _plan_serac(ctx: _Context) -> list[Phase]:
    spec, sizes = ctx.spec, ctx.sizes
    d = spec.hidden_size
    classifier = (d * d + 3 * d) * FP32
    on_disk = _editor_state_bytes(ctx)
    # Building a ScopeClassifier initialises its projection from an identity matrix, a temporary of its size; the
    # edit memory builds its own copy of the classifier while the loaded one is alive.
    # A trained classifier is checked against the base model by fingerprinting the input embedding (and one MLP
    # weight), one at a time.
    check = sizes.fingerprint_copy(spec.vocab_size * d) if on_disk is not None else 0
    loading = ctx.weights_phase("scope classifier: loading", scope_classifier=classifier,
                                classifier_tensors_read=on_disk or 0, identity_init=d * d * FP32,
                                fingerprint_copy=check)
    tokens = ctx.num_requests * max(s.prompt_tokens for s in ctx.shapes)
    features = ctx.weights_phase("scope features", scope_classifier=classifier,
                                 forward_temporaries=sizes.block_forward(tokens) + sizes.hidden(tokens, FP32))
    memory = ctx.weights_phase("edit memory", scope_classifier=classifier, edit_components=classifier,
                               identity_init=d * d * FP32)
    return [loading, features, memory]


# Side memories trained beside the model ---------------------------------------------------------------------------
def _tail_training_phase(ctx: _Context, name: str, first_block: int, trained_numel: int, extra_saved: int,
                         tokens: int, sequence: int, logits_held: bool = False, resumed: bool = False,
                         **held: int) -> Phase:
    """A step that trains something at block `first_block` (its output or its FFN) with the target likelihood.

    `resumed`: the step recomputes only the blocks from the trained one on, and the logits at the target tokens
    (`ResumedTargetLogProbs`, decoder-only models), not at every position."""
    sizes = ctx.sizes
    padded = tokens > sequence  # several rows of different lengths
    rows = tokens
    if resumed and not ctx.spec.is_encoder_decoder:
        rows = max(s.target_tokens for s in ctx.shapes)
    return ctx.weights_phase(
        name, **held, **_dense_training(trained_numel),
        activations=sizes.blocks_saved(ctx.spec.num_layers - first_block - 1, tokens, sequence, padded)
        + extra_saved,
        logits_and_loss=sizes.loss_head(rows, logits_held=logits_held),
    )


@_planner("tpatcher")
def _plan_tpatcher(ctx: _Context) -> list[Phase]:
    config, spec, sizes = ctx.config, ctx.spec, ctx.sizes
    (layer,) = config.resolve_layers(spec.layout)
    d, n = spec.hidden_size, config.neurons_per_edit
    memory_lengths = _memory_prompt_lengths(ctx)
    memory_lengths += [t for s in ctx.shapes for t in s.locality_tokens]
    rows = len(memory_lengths)
    width = max(memory_lengths)
    memory = sum(memory_lengths) * d * FP32
    # The out-of-scope prompts run through the whole model once: their logits are the largest tensor here.
    reading = ctx.weights_phase("out-of-scope inputs", **sizes.full_forward(rows * width),
                                recorded_inputs=sizes.hidden(rows * width) + memory)
    sequence = max(ctx.edit_lengths())
    others = max(0, ctx.num_requests - 1)
    patches = ctx.num_requests * n * (2 * d + 1) * FP32
    training = _tail_training_phase(
        ctx, "patch training step", layer - 1, n * (2 * d + 1), sizes.hidden(sequence, FP32), sequence, sequence,
        out_of_scope_inputs=memory + others * sequence * d * FP32, edit_components=patches, resumed=True)
    phases = [reading, training]
    if others:
        phases.append(ctx.weights_phase("other requests' inputs", **sizes.full_forward(others * sequence),
                                        out_of_scope_inputs=memory))
    ctx.assumptions.update(tpatcher_layer=layer, out_of_scope_prompts=rows)
    return phases


def _memory_prompt_lengths(ctx: _Context) -> list[int]:
    from .methods.tpatcher.editor import GENERIC_MEMORY_PROMPTS

    prompts = ctx.config.memory_prompts if ctx.config.memory_prompts is not None else GENERIC_MEMORY_PROMPTS
    if ctx.tokenizer is not None:
        return [max(1, len(ctx.tokenizer(p)["input_ids"])) for p in prompts]
    return [_DEFAULT_MEMORY_PROMPT_TOKENS] * len(prompts)


@_planner("calinet")
def _plan_calinet(ctx: _Context) -> list[Phase]:
    config, spec = ctx.config, ctx.spec
    layers = config.resolve_layers(spec.layout)
    d = spec.hidden_size
    numel = len(layers) * config.num_slots * (2 * d + 1)
    sequence = max(ctx.edit_lengths())
    tokens = min(ctx.num_requests, config.requests_per_pass) * sequence  # one pass of the step at a time
    saved = len(layers) * tokens * (d + 2 * config.num_slots) * FP32  # the FFN input (fp32), scores, activations
    return [_tail_training_phase(ctx, "slot training step", min(layers) - 1, numel, saved, tokens, sequence)]


@_planner("grace")
def _plan_grace(ctx: _Context) -> list[Phase]:
    config, spec, sizes = ctx.config, ctx.spec, ctx.sizes
    (layer,) = config.resolve_layers(spec.layout)
    d = spec.hidden_size
    sequence = max(ctx.edit_lengths())
    codebook = ctx.num_requests * (2 * d + 1) * FP32
    reading = ctx.weights_phase("key reading", **sizes.full_forward(sequence), codebook=codebook)
    training = _tail_training_phase(ctx, "value training step", layer, d, sizes.hidden(sequence), sequence, sequence,
                                    codebook=codebook, resumed=True)
    ctx.assumptions["grace_layer"] = layer
    return [reading, training]


@_planner("ike")
def _plan_ike(ctx: _Context) -> list[Phase]:
    # IKE stores texts; editing runs no forward pass.
    return [ctx.weights_phase("storing the facts")]


# -- after every method: the half-precision check; evaluation --------------------------------------------------------
def _largest_weight(spec: ModelSpec) -> int:
    """The largest weight an edit touches: an MLP projection, or FT's attention output projection."""
    return max(spec.hidden_size * spec.intermediate_size, spec.hidden_size * spec.q_dim)


def _precision_check_phase(ctx: _Context, components: int) -> Phase:
    """On fp16/bf16 models, `EditedModel.add_edits` scores the edited targets before and after installing the edit
    (`hf_knowedit.precision`): one `score_targets` call over the checked requests' prompts and targets."""
    from .precision import MAX_CHECKED_REQUESTS

    checked = ctx.shapes[:MAX_CHECKED_REQUESTS]
    batches = _chunks(sorted(ctx.edit_lengths(checked) if not ctx.spec.is_encoder_decoder
                             else [s.target_tokens for s in checked]), DEFAULT_SCORER_BATCH_SIZE)
    tokens = max(len(batch) * max(batch) for batch in batches)
    return ctx.weights_phase("half-precision check (scoring the targets)", edit_components=components,
                             scoring_logits=ctx.sizes.scoring_head(tokens))



def _edit_components_bytes(ctx: _Context, phases: list[Phase]) -> int:
    return max((p.components.get("edit components", 0) for p in phases), default=0)


def _routing_context_tokens(ctx: _Context, shape: RequestShape) -> int:
    """Tokens put before an in-scope prompt by SERAC and IKE (the fact, and IKE's demonstrations)."""
    fact = shape.prompt_tokens + shape.target_tokens + 4  # "New Fact: <prompt> <target>\n"
    if ctx.method == "ike" and ctx.config.demonstrations_file and ctx.config.num_demonstrations:
        longest = max([shape.prompt_tokens, *shape.rephrase_tokens, *shape.locality_tokens])
        return fact + ctx.config.num_demonstrations * (fact + longest + shape.target_tokens + 2)
    return fact if ctx.method in ("serac", "ike") else 0


def _scored_lengths(ctx: _Context, shapes: list[RequestShape], routed: bool) -> list[int]:
    """The length of every teacher-forced pair `score_cases` scores for `shapes`: the edit prompt and each rephrase
    with the new and the true target, each locality prompt with its answer and with the new target. After a SERAC or
    IKE edit, the edit prompt and rephrases of an edited case are routed: their context comes before them."""
    lengths = []
    for shape in shapes:
        context = _routing_context_tokens(ctx, shape) if routed else 0
        target = shape.target_tokens
        if ctx.spec.is_encoder_decoder:
            lengths += [target] * 2 * (1 + len(shape.rephrase_tokens) + len(shape.locality_tokens))
            continue
        lengths += [p + target + context for p in [shape.prompt_tokens, *shape.rephrase_tokens] for _ in range(2)]
        lengths += [p + target for p in shape.locality_tokens for _ in range(2)]
    return lengths


def _scorer_batch_tokens(ctx: _Context, requests: list, batch_size: int, routed: bool) -> int:
    """The tokens of the largest padded batch `BatchScorer.score_targets` makes of the cases' pairs, replayed: the
    pairs `score_cases` asks for, in the scorer's order (by characters), cut into batches of `batch_size`, each
    padded to its longest row (with SERAC's or IKE's context before the edited cases' own prompts, after the edit)."""
    from .tokenization import split_prompt_target

    pairs: dict[tuple[str, str], int] = {}  # (prompt, target) -> context tokens
    for request, shape in zip(requests, ctx.all_shapes, strict=False):
        context = _routing_context_tokens(ctx, shape) if routed else 0
        for prompt in [request.filled_prompt, *request.rephrase_prompts]:
            for target in (request.target_new, request.target_true):
                if target:
                    pairs.setdefault((prompt, target), context)
        for probe in request.locality:
            if probe.answers:
                for target in (probe.answers[0], request.target_new):
                    pairs.setdefault((probe.prompt, target), 0)
        for probe in request.portability:
            if probe.answers:
                pairs.setdefault((probe.prompt, probe.answers[0]), 0)
    items = list(pairs.items())
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0][0]) + len(items[i][0][1]), i))
    largest = 1
    for start in range(0, len(order), batch_size):
        rows = [items[i] for i in order[start : start + batch_size]]
        width = max(sum(len(ids) for ids in split_prompt_target(ctx.tokenizer, p, t)) + c for (p, t), c in rows)
        largest = max(largest, len(rows) * width)
    return largest


def _largest_batch(lengths: list[int], batch_size: int, full: bool) -> tuple[int, int]:
    """`(rows, tokens)` of the largest padded batch the scorer makes of `lengths`: as many rows as it batches, each
    as long as the longest (an upper bound: it sorts by characters, which only roughly orders tokens); with `full`,
    a run with many more cases, full batches."""
    rows = batch_size if full else min(batch_size, len(lengths))
    return rows, rows * max(lengths)


def _scoring_phases(ctx: _Context, scorer_batch_size: int, fluency_tokens: int, components: int,
                    after: bool) -> list[Phase]:
    """`BatchScorer.score_targets` over the cases' probes, and the greedy generations (exact match, fluency).

    Before the edit every case given is scored (the harness scores the cases in chunks of `scorer_batch_size`);
    after it, the edited cases. Without `requests`, batches are assumed full (a run over many cases).
    """
    sizes, spec = ctx.sizes, ctx.spec
    shapes = (ctx.shapes if after else ctx.all_shapes)[:scorer_batch_size]
    full = not ctx.requests
    if ctx.requests and ctx.tokenizer is not None and not spec.is_encoder_decoder:
        cases = ctx.requests[: len(ctx.shapes)] if after else ctx.requests[:scorer_batch_size]
        tokens = _scorer_batch_tokens(ctx, cases, scorer_batch_size, routed=after)
    else:
        tokens = _largest_batch(_scored_lengths(ctx, shapes, routed=after), scorer_batch_size, full)[1]
    head = sizes.scoring_head(tokens)
    if after and any(_routing_context_tokens(ctx, s) for s in shapes):
        head += sizes.logits(tokens)  # the routed call reads its logits back into a tensor of the prompts' shape
    when = "after" if after else "before"
    phases = [ctx.weights_phase(f"scoring {when} the edit", edit_components=components, scoring_logits=head)]
    if fluency_tokens:
        prompts = scorer_batch_size if full else min(scorer_batch_size, len(shapes))
        context = max(_routing_context_tokens(ctx, s) for s in shapes) if after else 0
        length = max(s.prompt_tokens for s in shapes) + context + fluency_tokens
        cache = 2 * spec.num_layers * prompts * length * spec.kv_dim * sizes.b
        prefill = prompts * (length - fluency_tokens)
        phases.append(ctx.weights_phase(f"generating {when} the edit", edit_components=components, kv_cache=cache,
                                        logits=3 * sizes.logits32(prompts),
                                        forward_temporaries=sizes.block_forward(prefill)))
    return phases


# -- the entry point -------------------------------------------------------------------------------------------------
def estimate_peak_memory(
    method_or_config: "str | EditConfig | dict | os.PathLike",
    model: "str | os.PathLike | nn.Module | Any" = "default",
    *,
    overrides: dict[str, Any] | None = None,
    batch_size: int = 1,
    mode: str = "edit",
    dtype: "str | torch.dtype" = "float32",
    device: str = "cpu",
    requests: "Iterable | None" = None,
    request_shape: RequestShape | None = None,
    tokenizer=None,
    statistics_cached: bool | None = None,
    scorer_batch_size: int = DEFAULT_SCORER_BATCH_SIZE,
    fluency_tokens: int = DEFAULT_FLUENCY_TOKENS,
) -> MemoryPlan:
    """Estimate the peak memory of editing (or evaluating) with a method, before loading the model's weights.

    Args:
        method_or_config (`str`, `EditConfig`, `dict` or path):
            A registered method name (`"rome"`), a config, a dict of config fields with `edit_type`, or a JSON config
            file / saved edit folder (as `hf-knowedit edit --config` reads).
        model (`str`, `nn.Module` or `PretrainedConfig`, *optional*, defaults to `"default"`):
            A model id or local path (read from local files only), `"default"` for the embedded model, a config, or a
            model (meta or real) whose structure is read.
        overrides (`dict`, *optional*): config fields to override (`--set`).
        batch_size (`int`, *optional*, defaults to `1`): requests edited at once.
        mode (`str`, *optional*, defaults to `"edit"`): `"edit"` (one edit call) or `"evaluate"` (scoring before and
            after the edit, as `hf-knowedit evaluate` does, with `scorer_batch_size` prompts per pass and
            `fluency_tokens` generated tokens).
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"float32"`): the dtype the model is loaded in.
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"` or `"cuda"`; the tensor memory is the same, the CUDA
            context and the caching allocator's slack are not included.
        requests (iterable of `EditRequest`, *optional*): the requests to plan for; their token counts are used
            (`tokenizer`, or the model's tokenizer from local files). The first `batch_size` are used.
        request_shape (`RequestShape`, *optional*): token counts to assume for every request when `requests` is not
            given (defaults: 16 prompt and 4 target tokens).
        tokenizer (*optional*): the model's tokenizer, to count the tokens of `requests`.
        statistics_cached (`bool`, *optional*): whether the second-moment statistics of ROME, MEMIT and AlphaEdit are
            on disk already; `None` looks for them in the statistics cache by name.

    Returns:
        :class:`MemoryPlan`: the peak, its breakdown by component, and the total of each phase.

    Raises:
        `EditConfigError`: an unknown method, invalid config values or layers, or an invalid option.
        `ArtifactError`: the model is not found locally.
    """
    dtype_name = _dtype_name(dtype)
    if mode not in MODES:
        raise EditConfigError(f"mode must be one of {MODES}, got {mode!r}.")
    if device not in DEVICES:
        raise EditConfigError(f"device must be one of {DEVICES}, got {device!r}.")
    for name, value, low in (("batch_size", batch_size, 1), ("scorer_batch_size", scorer_batch_size, 1),
                             ("fluency_tokens", fluency_tokens, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EditConfigError(f"{name} must be an integer >= {low}, got {value!r}.")
    config = _build_config(method_or_config, overrides)
    if config.edit_type not in MEMORY_PLANNERS:
        raise EditConfigError(
            f"The method {config.edit_type!r} has no memory planner; planned methods: {sorted(MEMORY_PLANNERS)}. "
            "Register one with hf_knowedit.plan.register_memory_planner(name, planner)."
        )
    spec = read_model_spec(model)
    from .config import get_editor_class
    from .editor import BaseEditor

    editor_cls = get_editor_class(config.edit_type)
    if isinstance(editor_cls, type) and issubclass(editor_cls, BaseEditor):
        _check_model_for(editor_cls, config, spec)
    config.resolve_layers(spec.layout)  # EditConfigError for layers the model does not have
    if tokenizer is None and requests is not None:
        tokenizer = _local_tokenizer(model)
    if tokenizer is None and config.edit_type == "tpatcher":
        tokenizer = _local_tokenizer(model, required=False)
    limit = max(batch_size, scorer_batch_size) if mode == "evaluate" else batch_size
    requests = None if requests is None else _as_request_list(requests)[:limit]
    all_shapes = _request_shapes(requests, tokenizer, request_shape, batch_size)
    shapes = all_shapes[:batch_size]
    ctx = _Context(config.edit_type, config, spec, _Sizes(spec, DTYPE_BYTES[dtype_name]), shapes, mode,
                   statistics_cached, tokenizer, {}, [], all_shapes, requests or [])
    phases = MEMORY_PLANNERS[config.edit_type](ctx)
    if dtype_name in HALF_DTYPES:
        components = _edit_components_bytes(ctx, phases)
        # The edit's base model is fingerprinted by the weights it touches (at most an MLP weight at a time).
        phases.append(ctx.weights_phase("fingerprint of the edited weights", edit_components=components,
                                        fingerprint_copy=ctx.sizes.fingerprint_copy(_largest_weight(spec))))
        phases.append(_precision_check_phase(ctx, components))
    if mode == "evaluate":
        components = _edit_components_bytes(ctx, phases)
        phases = _scoring_phases(ctx, scorer_batch_size, fluency_tokens, 0, after=False) + phases \
            + _scoring_phases(ctx, scorer_batch_size, fluency_tokens, components, after=True)
    peak = max(phases, key=lambda p: p.total)
    first = shapes[0]
    assumptions = {"prompt_tokens": first.prompt_tokens, "target_tokens": first.target_tokens}
    if first.rephrase_tokens:
        assumptions["rephrase_tokens"] = first.rephrase_tokens
    assumptions.update(ctx.assumptions)
    notes = list(ctx.notes)
    if device == "cuda":
        notes.append("CUDA: tensor memory as torch.cuda.max_memory_allocated() counts it; the CUDA context "
                     "(several hundred MB per process) and the caching allocator's reserve come on top.")
    if spec.is_encoder_decoder:
        notes.append("Encoder-decoder: the decoder's blocks are modelled; the encoder's forward pass is not.")
    return MemoryPlan(
        method=config.edit_type,
        model=spec.name,
        dtype=dtype_name,
        device=device,
        mode=mode,
        batch_size=batch_size,
        components=dict(peak.components),
        peak_phase=peak.name,
        phases={p.name: p.total for p in phases},
        assumptions=assumptions,
        notes=notes,
    )


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise EditConfigError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}.")
    return name


def _build_config(method_or_config, overrides) -> EditConfig:
    if isinstance(method_or_config, EditConfig):
        if overrides:
            data = {**method_or_config.to_dict(), **overrides}
            return build_config(method_or_config.edit_type, data)
        return method_or_config
    if isinstance(method_or_config, str) and not Path(method_or_config).expanduser().exists() \
            and not method_or_config.endswith(".json"):
        return build_config(method_or_config, None, overrides)
    return build_config(None, method_or_config, overrides)


def _check_model_for(editor_cls, config, spec: ModelSpec) -> None:
    """The method's own refusal of the model (ROME on an encoder-decoder, ...), checked on the meta structure."""
    from .locate import LocateThenEditEditor

    if issubclass(editor_cls, LocateThenEditEditor) and spec.is_encoder_decoder:
        from .errors import ArchitectureNotSupportedError

        raise ArchitectureNotSupportedError(
            f"{config.edit_type} edits decoder-only language models; {spec.name} is an encoder-decoder."
        )


def _local_tokenizer(model, required: bool = True):
    """The model's tokenizer from local files, or `None` when there is none and it is not required."""
    from transformers import AutoTokenizer

    from .modeling import DEFAULT_MODEL_ALIASES, default_model_cache_dir, prepare_tokenizer

    if isinstance(model, nn.Module) or not isinstance(model, (str, os.PathLike)):
        name = _model_name(getattr(model, "config", model))
    else:
        name = str(model)
    if name in DEFAULT_MODEL_ALIASES or name.endswith(DEFAULT_MODEL_ALIASES[1]):
        name = str(default_model_cache_dir())
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(name, local_files_only=True))
    except (OSError, ValueError, TypeError) as error:
        if not required:
            return None
        raise ArtifactError(f"No tokenizer for {name!r} in local files ({error}); pass tokenizer=... to count the "
                            "requests' tokens, or give request_shape instead of requests.") from None


def _as_request_list(requests) -> list:
    from .requests import as_requests

    return as_requests(requests)


def _request_shapes(requests, tokenizer, shape: RequestShape | None, batch_size: int) -> list[RequestShape]:
    if requests is None:
        return [shape or RequestShape()] * batch_size
    if not requests:
        raise EditConfigError("requests is empty: give at least one request to plan for.")
    shapes = [RequestShape.from_request(r, tokenizer) for r in requests]
    while len(shapes) < batch_size:  # fewer requests than the batch: repeat the longest
        shapes.append(max(shapes, key=lambda s: s.prompt_tokens + s.target_tokens))
    return shapes


def _short(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"[{value[0]}, ..., {value[-1]}] ({len(value)})"
    return str(value)


__all__ = [
    "MEMORY_PLANNERS",
    "MemoryPlan",
    "ModelSpec",
    "Phase",
    "RequestShape",
    "estimate_peak_memory",
    "read_model_spec",
    "register_memory_planner",
]
