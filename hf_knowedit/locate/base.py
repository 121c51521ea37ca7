"""What ROME, MEMIT and AlphaEdit share: the config fields of the locate-then-edit recipe and the editor skeleton.

A method subclasses :class:`LocateThenEditConfig` (its own fields and defaults) and :class:`LocateThenEditEditor`
(its :meth:`~LocateThenEditEditor.solve`); keys, values, statistics, request checks and phase timings live here.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..config import EditConfig
from ..devices import execution_device
from ..editor import BaseEditor
from ..errors import ArchitectureNotSupportedError, ContradictoryRequestsError, EditConfigError
from ..utils import get_logger
from .keys import context_prefixes


logger = get_logger(__name__)

MOM2_DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class LocateThenEditConfig(EditConfig):
    """Fields shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

    Args:
        v_num_grad_steps (`int`, *optional*, defaults to `25`):
            Adam steps of the target-value optimisation (ROME Eq. 4).
        v_lr (`float`, *optional*, defaults to `0.5`):
            Adam learning rate of the target-value optimisation.
        v_weight_decay (`float`, *optional*, defaults to `0.5`):
            Weight of the penalty `||δ|| / ||v₀||²` on the change of the value.
        clamp_norm_factor (`float`, *optional*, defaults to `4.0`):
            The change `δ` of the value is kept within `clamp_norm_factor * ||v₀||`.
        kl_factor (`float`, *optional*, defaults to `0.0625`):
            Weight of the KL term on the "{subject} is a" prompts (essence preservation).
        target_probability (`float`, *optional*, defaults to `0.95`):
            A request stops optimising once its target tokens reach this mean probability (`exp(-NLL)`).
        num_context_prefixes (`int`, *optional*, defaults to `5`):
            Model-generated prefixes over which keys are averaged and values optimised (besides the bare prompt).
        context_prefix_length (`int`, *optional*, defaults to `10`):
            Tokens per generated prefix.
        values_batch_size (`int`, *optional*, defaults to `16`):
            Requests whose values are optimised together in one batched forward/backward.
        keys_batch_size (`int`, *optional*, defaults to `64`):
            Texts per forward pass when computing keys.
        mom2_adjustment (`bool`, *optional*, defaults to `True`):
            Use the second moment `C = E[kkᵀ]` of the keys (ROME's `C⁻¹`, MEMIT's `λC`); `False` uses the identity.
        mom2_num_tokens (`int`, *optional*, defaults to `100000`):
            Tokens of the corpus over which `C` is estimated (about 10 × d_k suffice, Gupta et al. 2025).
        mom2_dtype (`str`, *optional*, defaults to `"float32"`):
            Accumulation dtype of the statistics.
        stats_corpus (`str`, *optional*, defaults to `None`):
            Text file, folder or `datasets` id of the corpus; `None` uses `HF_KNOWEDIT_STATS_CORPUS` (WikiText).
        stats_dir (`str`, *optional*, defaults to `None`):
            A directory or Hub repo id of precomputed statistics (`LayerStatistics.from_pretrained`); with several
            layers, write `{layer}` where the layer index goes (e.g. `"stats/layer_{layer}"`).
    """

    edit_type: ClassVar[str] = ""

    v_num_grad_steps: int = field(default=25, metadata={"help": "Adam steps of the target-value optimisation."})
    v_lr: float = field(default=0.5, metadata={"help": "Adam learning rate of the target-value optimisation."})
    v_weight_decay: float = field(default=0.5, metadata={"help": "Penalty weight on ||δ|| / ||v₀||²."})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": "||δ|| <= clamp_norm_factor * ||v₀||."})
    kl_factor: float = field(default=0.0625, metadata={"help": "Weight of the KL term on '{subject} is a'."})
    target_probability: float = field(default=0.95, metadata={"help": "Early stop once the target reaches this."})
    num_context_prefixes: int = field(default=5, metadata={"help": "Generated prefixes besides the bare prompt."})
    context_prefix_length: int = field(default=10, metadata={"help": "Tokens per generated prefix."})
    values_batch_size: int = field(default=16, metadata={"help": "Requests optimised together."})
    keys_batch_size: int = field(default=64, metadata={"help": "Texts per forward pass for keys."})
    mom2_adjustment: bool = field(default=True, metadata={"help": "Use the keys' second moment C (else identity)."})
    mom2_num_tokens: int = field(default=100_000, metadata={"help": "Corpus tokens for the statistics."})
    mom2_dtype: str = field(default="float32", metadata={"help": f"One of {MOM2_DTYPES}."})
    stats_corpus: str | None = field(default=None, metadata={"help": "Corpus of the statistics; None = default."})
    stats_dir: str | None = field(default=None, metadata={"help": "Precomputed statistics (directory or repo id)."})

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        for attr in ("v_num_grad_steps", "values_batch_size", "keys_batch_size", "mom2_num_tokens",
                     "context_prefix_length"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EditConfigError(f"{name}.{attr} must be a positive integer, got {value!r}.")
        if isinstance(self.num_context_prefixes, bool) or not isinstance(self.num_context_prefixes, int) or not (
            0 <= self.num_context_prefixes <= 10
        ):
            raise EditConfigError(f"{name}.num_context_prefixes must be an integer in 0..10, got "
                                  f"{self.num_context_prefixes!r}.")
        for attr in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, attr) > 0:
                raise EditConfigError(f"{name}.{attr} must be positive, got {getattr(self, attr)!r}.")
        for attr in ("v_weight_decay", "kl_factor"):
            if not getattr(self, attr) >= 0:
                raise EditConfigError(f"{name}.{attr} must be non-negative, got {getattr(self, attr)!r}.")
        if not 0 < self.target_probability <= 1:
            raise EditConfigError(f"{name}.target_probability must be in (0, 1], got {self.target_probability!r}.")
        if self.mom2_dtype not in MOM2_DTYPES:
            raise EditConfigError(f"{name}.mom2_dtype must be one of {MOM2_DTYPES}, got {self.mom2_dtype!r}.")


def layer_statistics(edited_model, layers: list[int], config: LocateThenEditConfig) -> dict:
    """`{layer: LayerStatistics}` of the base model (edits disabled), from `config.stats_dir` or computed and cached."""
    from .. import statistics

    kwargs = {"num_tokens": config.mom2_num_tokens, "dtype": getattr(torch, config.mom2_dtype)}
    if config.stats_corpus is not None:
        kwargs["corpus"] = config.stats_corpus
    with edited_model.disable_edits():
        if config.stats_dir is not None:
            return {
                layer: statistics.LayerStatistics.from_pretrained(
                    str(config.stats_dir).replace("{layer}", str(layer)), model=edited_model.base_model, layer=layer
                )
                for layer in layers
            }
        return statistics.get_layer_statistics(edited_model.base_model, edited_model.tokenizer, list(layers),
                                               **kwargs)


class LocateThenEditEditor(BaseEditor):
    """The skeleton of ROME, MEMIT and AlphaEdit: check the model and the requests, time the phases, solve.

    Subclasses implement :meth:`edit` and call :meth:`phase` around their keys / values / solve work, so that
    `self.stats` holds `statistics_seconds`, `keys_seconds`, `values_seconds` and `solve_seconds`.
    """

    config_class = LocateThenEditConfig
    method_name: ClassVar[str] = "locate-then-edit"

    def check_model(self, edited_model) -> None:
        layout = edited_model.layout
        if layout.is_encoder_decoder:
            raise ArchitectureNotSupportedError(
                f"{self.method_name} edits decoder-only language models; this {layout.model_type!r} model is an "
                "encoder-decoder, whose facts are not recalled through one MLP at the subject's last token. Use "
                "FTConfig for it, or a decoder-only model."
            )
        self.config.resolve_layers(layout)

    def compute_components(self, edited_model, requests):
        check_consistent_requests(requests)
        self.stats = {"statistics_seconds": 0.0, "keys_seconds": 0.0, "values_seconds": 0.0, "solve_seconds": 0.0}
        layers = self.config.resolve_layers(edited_model.layout)
        with edited_model.disable_edits(), torch.no_grad():
            prefixes = context_prefixes(edited_model.base_model, edited_model.tokenizer,
                                        self.config.num_context_prefixes, self.config.context_prefix_length)
        return self.edit(edited_model, requests, layers, prefixes)

    def edit(self, edited_model, requests, layers: list[int], prefixes: list[str]) -> dict:
        raise NotImplementedError

    @contextmanager
    def phase(self, name: str):
        """Add the seconds spent inside the block to `self.stats[f"{name}_seconds"]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"{name}_seconds"
            self.stats[key] = self.stats.get(key, 0.0) + time.perf_counter() - start

    def statistics(self, edited_model, layers: list[int]) -> dict:
        """The layers' statistics, timed as the `statistics` phase (cached after the first call)."""
        with self.phase("statistics"):
            return layer_statistics(edited_model, layers, self.config)


def check_consistent_requests(requests) -> None:
    """Raise :class:`ContradictoryRequestsError` when requests ask for different targets of the same subject and
    prompt; it lists every such pair."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    conflicts = []
    for index, request in enumerate(requests):
        key = (request.subject, request.filled_prompt)
        if key in seen and seen[key][1] != request.target_new:
            conflicts.append((seen[key][0], index))
        seen.setdefault(key, (index, request.target_new))
    if conflicts:
        first, later = conflicts[0]
        request = requests[later]
        raise ContradictoryRequestsError(
            f"Requests {first} and {later} contradict each other: {request.filled_prompt!r} (subject "
            f"{request.subject!r}) -> {requests[first].target_new!r} and -> {request.target_new!r}"
            + (f" (and {len(conflicts) - 1} more such pair(s))" if len(conflicts) > 1 else "")
            + ". Keep one target per fact, or edit them in separate calls.",
            conflicts,
        )


def module_output(module, keys: torch.Tensor) -> torch.Tensor:
    """The module's output for keys `(N, d_k)`, in fp32, with the active and pending edits on it (its hooks run)."""
    with torch.no_grad():
        out = module(keys.to(device=execution_device(module), dtype=module.weight.dtype))
    return (out[0] if isinstance(out, tuple) else out).float()
