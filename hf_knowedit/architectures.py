"""Where the parts of a transformer live: blocks, MLP projections, attention output, final norm, head, embedding.

Editing methods locate the modules they read and write through a [`ModelLayout`], which [`resolve_layout`] derives
from the *structure* of any `transformers` model (never from its name): the block list is the `nn.ModuleList` whose
length is the number of layers in the config, and inside a block the projections are told apart by their shapes
(hidden -> intermediate for the MLP input, intermediate -> hidden for the MLP output, hidden-sized output inside the
attention submodule for the attention output). GPT-2's `Conv1D`, which stores its weight as `(in, out)`, is handled
by [`linear_shape`] and [`weight_as_out_in`].

Models whose structure cannot be resolved raise [`~hf_knowedit.errors.ArchitectureNotSupportedError`]; a layout can
then be given by hand with [`register_architecture`].
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ArchitectureNotSupportedError, EditConfigError
from .utils import get_logger


logger = get_logger(__name__)

LayoutFn = Callable[[nn.Module], "ModelLayout"]

# Config attributes, in order of preference. `hidden_size` is aliased to `n_embd`/`d_model` by most configs.
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_INTERMEDIATE_SIZE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "decoder_ffn_dim", "ffn_hidden_size")
_DECODER_LAYERS_KEYS = ("num_decoder_layers", "decoder_layers", "num_hidden_layers", "n_layer", "num_layers")
_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Name hints, used only to break ties between modules whose shapes fit equally well.
_ATTENTION_HINTS = ("attn", "attention")
_CROSS_ATTENTION_HINTS = ("cross", "encdec", "enc_dec", "encoder")
_MLP_HINTS = ("mlp", "ffn", "feed_forward", "feedforward", "denserelu", "layerff")
_MLP_OUT_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "wo", "w2", "out_proj")
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "o", "wo", "out")

_CUSTOM_LAYOUTS: dict[str, LayoutFn] = {}
_LAYOUT_CACHE: weakref.WeakKeyDictionary[nn.Module, ModelLayout] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelLayout:
    """Where the parts that knowledge editing touches live inside one model.

    Paths are dotted names as in `model.named_modules()`: `*_path` fields start at the model root, `*_name(s)` fields
    are relative to one block (add [`block_path`] in front, or use the `*_path(layer)` helpers).

    Args:
        model_type (`str`):
            The model's `config.model_type`, e.g. `"llama"` or `"gemma3_text"`.
        is_encoder_decoder (`bool`):
            Whether the model is an encoder-decoder; the layout then describes the decoder.
        blocks_path (`str`):
            The `nn.ModuleList` of transformer blocks, e.g. `"model.layers"`, `"transformer.h"`, `"decoder.block"`.
        num_layers (`int`):
            The number of blocks.
        mlp_in_names (`tuple[str, ...]`):
            The MLP input projection(s), hidden -> intermediate (or 2 * intermediate when fused), relative to a block,
            e.g. `("mlp.gate_proj", "mlp.up_proj")`, `("mlp.c_fc",)`, `("fc1",)`.
        mlp_out_name (`str`):
            The MLP output projection, intermediate -> hidden, relative to a block, e.g. `"mlp.down_proj"`, `"fc2"`.
            This is the module that ROME-style methods rewrite.
        attn_out_name (`str`):
            The self-attention output projection relative to a block, e.g. `"self_attn.o_proj"`, `"attn.c_proj"`.
        final_norm_path (`str`):
            The norm applied after the last block, e.g. `"model.norm"`, `"transformer.ln_f"`.
        lm_head_path (`str`):
            The output embedding (language-model head), e.g. `"lm_head"`.
        embed_path (`str`):
            The input token embedding, e.g. `"model.embed_tokens"`, `"transformer.wte"`.
        weights_transposed (`bool`):
            `True` when the projections are `transformers.pytorch_utils.Conv1D`, whose weight is `(in, out)`.

    Example:

    ```py
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_knowedit.architectures import resolve_layout
    >>> config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> layout = resolve_layout(LlamaForCausalLM(config))
    >>> layout.mlp_out_path(1), layout.mlp_in_names, layout.default_layers()
    ('model.layers.1.mlp.down_proj', ('mlp.gate_proj', 'mlp.up_proj'), [1])

    ```
    """

    model_type: str
    is_encoder_decoder: bool
    blocks_path: str
    num_layers: int
    mlp_in_names: tuple[str, ...]
    mlp_out_name: str
    attn_out_name: str
    final_norm_path: str
    lm_head_path: str
    embed_path: str
    weights_transposed: bool

    def __post_init__(self):
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ArchitectureNotSupportedError(
                f"ModelLayout.num_layers must be a positive int, got {self.num_layers!r} for {self.model_type!r}."
            )
        if isinstance(self.mlp_in_names, str) or not self.mlp_in_names:
            raise ArchitectureNotSupportedError(
                f"ModelLayout.mlp_in_names must be a non-empty tuple of names, got {self.mlp_in_names!r}."
            )
        object.__setattr__(self, "mlp_in_names", tuple(self.mlp_in_names))

    # ----------------------------------------------------------------------------------------------------- paths
    def block_path(self, layer: int) -> str:
        """Dotted path of block `layer` from the model root, e.g. `"model.layers.3"`."""
        self.check_layer(layer, "layer")
        return f"{self.blocks_path}.{layer}"

    def mlp_out_path(self, layer: int) -> str:
        """Dotted path of the MLP output projection of block `layer`, e.g. `"model.layers.3.mlp.down_proj"`."""
        return f"{self.block_path(layer)}.{self.mlp_out_name}"

    def mlp_in_paths(self, layer: int) -> tuple[str, ...]:
        """Dotted paths of the MLP input projection(s) of block `layer`."""
        block = self.block_path(layer)
        return tuple(f"{block}.{name}" for name in self.mlp_in_names)

    def attn_out_path(self, layer: int) -> str:
        """Dotted path of the self-attention output projection of block `layer`."""
        return f"{self.block_path(layer)}.{self.attn_out_name}"

    # --------------------------------------------------------------------------------------------------- modules
    def module(self, model: nn.Module, path: str) -> nn.Module:
        """The submodule of `model` at the dotted `path` (`model.get_submodule(path)`)."""
        return model.get_submodule(path)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The `nn.ModuleList` of transformer blocks of `model`."""
        return model.get_submodule(self.blocks_path)

    def mlp_out(self, model: nn.Module, layer: int) -> nn.Module:
        """The MLP output projection of block `layer`."""
        return model.get_submodule(self.mlp_out_path(layer))

    def mlp_in(self, model: nn.Module, layer: int) -> tuple[nn.Module, ...]:
        """The MLP input projection(s) of block `layer`."""
        return tuple(model.get_submodule(path) for path in self.mlp_in_paths(layer))

    def attn_out(self, model: nn.Module, layer: int) -> nn.Module:
        """The self-attention output projection of block `layer`."""
        return model.get_submodule(self.attn_out_path(layer))

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last block."""
        return model.get_submodule(self.final_norm_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output embedding (language-model head)."""
        return model.get_submodule(self.lm_head_path)

    def input_embeddings(self, model: nn.Module) -> nn.Module:
        """The input token embedding."""
        return model.get_submodule(self.embed_path)

    # ---------------------------------------------------------------------------------------------------- layers
    def check_layer(self, layer: int, field: str = "layers") -> None:
        """Raise [`~hf_knowedit.errors.EditConfigError`] unless `layer` is a block index in `0..num_layers - 1`.

        Args:
            layer (`int`):
                The block index to check. Negative indices are rejected, not counted from the end.
            field (`str`, *optional*, defaults to `"layers"`):
                The name of the config field the index comes from, quoted in the error message.
        """
        try:
            index = operator.index(layer)
        except TypeError:
            index = None
        if index is None or isinstance(layer, bool) or not 0 <= index < self.num_layers:
            raise EditConfigError(
                f"{field}={layer!r} is not a valid layer index: this {self.model_type!r} model has {self.num_layers} "
                f"layers, so {field} must be an integer in 0..{self.num_layers - 1} (negative indices are not "
                "counted from the end)."
            )

    def default_layers(self, fraction: float = 0.25, count: int = 1) -> list[int]:
        """Pick `count` consecutive layers starting at `round(fraction * (num_layers - 1))`, kept in range.

        Args:
            fraction (`float`, *optional*, defaults to `0.25`):
                The relative depth of the first layer, from 0 (first block) to 1 (last block). Early-middle MLPs
                (about a quarter of the depth) are where ROME-style methods find factual associations.
            count (`int`, *optional*, defaults to `1`):
                How many consecutive layers to return; capped at `num_layers`.

        Example: with 30 layers, `default_layers(0.25, 1)` is `[7]`; with 4 layers, `default_layers(1.0, 2)` is
        `[2, 3]`.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise EditConfigError(f"fraction must be a number in [0, 1], got {fraction!r}.")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise EditConfigError(f"count must be a positive integer, got {count!r}.")
        count = min(count, self.num_layers)
        start = round(fraction * (self.num_layers - 1))
        start = max(0, min(start, self.num_layers - count))
        return list(range(start, start + count))


# ---------------------------------------------------------------------------------------------- linear helpers
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """The `(out_features, in_features)` of an `nn.Linear` or a `transformers` `Conv1D` alike.

    Args:
        module (`nn.Module`):
            An `nn.Linear` (or subclass) or a `transformers.pytorch_utils.Conv1D`.

    Example:

    ```py
    >>> from torch import nn
    >>> from transformers.pytorch_utils import Conv1D
    >>> linear_shape(nn.Linear(8, 4)), linear_shape(Conv1D(4, 8))
    ((4, 8), (4, 8))

    ```
    """
    if isinstance(module, Conv1D):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    raise TypeError(f"Expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}.")


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a linear module viewed as `(out, in)`: `W` for `nn.Linear`, `W.T` for `Conv1D` (a view, no copy).

    Writing into the returned tensor writes into the module's weight.

    Args:
        module (`nn.Module`):
            An `nn.Linear` (or subclass) or a `transformers.pytorch_utils.Conv1D`.

    Example:

    ```py
    >>> from transformers.pytorch_utils import Conv1D
    >>> conv = Conv1D(4, 8)  # 8 inputs, 4 outputs, weight stored as (8, 4)
    >>> tuple(weight_as_out_in(conv).shape), weight_as_out_in(conv).data_ptr() == conv.weight.data_ptr()
    ((4, 8), True)

    ```
    """
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"Expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}.")


# ------------------------------------------------------------------------------------------------- registry
def register_architecture(model_type: str, layout_fn: LayoutFn) -> None:
    """Give the layout of a model type by hand, overriding structural detection for every model of that type.

    Use it when [`resolve_layout`] raises [`~hf_knowedit.errors.ArchitectureNotSupportedError`], or to pin a choice
    that detection makes differently from what you want. Registering again replaces the previous function, and the
    layouts already resolved are forgotten.

    Args:
        model_type (`str`):
            The `config.model_type` the function applies to, e.g. `"my_gpt"`.
        layout_fn (`Callable[[nn.Module], ModelLayout]`):
            Called with the model, returns its [`ModelLayout`].

    Example:

    ```py
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_knowedit.architectures import ModelLayout, register_architecture, resolve_layout
    >>> def my_llama_layout(model):
    ...     return ModelLayout(
    ...         model_type=model.config.model_type, is_encoder_decoder=False, blocks_path="model.layers",
    ...         num_layers=model.config.num_hidden_layers, mlp_in_names=("mlp.up_proj",),
    ...         mlp_out_name="mlp.down_proj", attn_out_name="self_attn.o_proj", final_norm_path="model.norm",
    ...         lm_head_path="lm_head", embed_path="model.embed_tokens", weights_transposed=False,
    ...     )
    >>> register_architecture("llama", my_llama_layout)
    >>> config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> resolve_layout(LlamaForCausalLM(config)).mlp_in_names
    ('mlp.up_proj',)
    >>> unregister_architecture("llama")  # back to structural detection

    ```
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string such as 'llama', got {model_type!r}.")
    if not callable(layout_fn):
        raise TypeError(f"layout_fn must be a callable model -> ModelLayout, got {type(layout_fn).__name__}.")
    _CUSTOM_LAYOUTS[model_type] = layout_fn
    _LAYOUT_CACHE.clear()


def unregister_architecture(model_type: str) -> None:
    """Forget a layout given with [`register_architecture`]; models of that type are detected structurally again.

    Args:
        model_type (`str`):
            The `config.model_type` to forget. Unknown types are ignored.
    """
    _CUSTOM_LAYOUTS.pop(model_type, None)
    _LAYOUT_CACHE.clear()


# --------------------------------------------------------------------------------------------------- resolve
def resolve_layout(model: nn.Module) -> ModelLayout:
    """Find where the blocks, MLP projections, attention output, final norm, head and embedding of `model` live.

    A layout registered with [`register_architecture`] for `model.config.model_type` wins; otherwise the layout is
    derived from the module structure alone: the block list is the `nn.ModuleList` whose length is the config's
    number of layers (the decoder's for encoder-decoder models), and inside the first block the projections are
    recognised by their shapes. The result is cached per model instance.

    Args:
        model (`transformers.PreTrainedModel`):
            The model to inspect.

    Returns:
        [`ModelLayout`]

    Raises:
        [`~hf_knowedit.errors.ArchitectureNotSupportedError`]: when some part cannot be found; the message says what
        and how to register a layout by hand.

    Example:

    ```py
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> layout = resolve_layout(GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=2)))
    >>> layout.blocks_path, layout.mlp_out_name, layout.weights_transposed
    ('transformer.h', 'mlp.c_proj', True)

    ```
    """
    try:
        return _LAYOUT_CACHE[model]
    except (KeyError, TypeError):
        pass
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or ""
    if model_type in _CUSTOM_LAYOUTS:
        layout = _CUSTOM_LAYOUTS[model_type](model)
        if not isinstance(layout, ModelLayout):
            raise TypeError(
                f"The layout function registered for {model_type!r} returned {type(layout).__name__}, "
                "expected a hf_knowedit.architectures.ModelLayout."
            )
    else:
        layout = _detect_layout(model)
    logger.debug("Resolved layout of %s: %s", type(model).__name__, layout)
    try:
        _LAYOUT_CACHE[model] = layout
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return layout


class _Resolver:
    """Structural detection for one model; every failure goes through `fail` so messages share one format."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = getattr(model, "config", None)
        self.model_type = str(getattr(self.config, "model_type", None) or "unknown")
        self.class_name = type(model).__name__

    def fail(self, what: str) -> ArchitectureNotSupportedError:
        return ArchitectureNotSupportedError(
            f"Cannot resolve the layout of this {self.model_type!r} model ({self.class_name}): {what}. "
            f'Describe it by hand with hf_knowedit.register_architecture("{self.model_type}", layout_fn), '
            "where layout_fn(model) returns a hf_knowedit.architectures.ModelLayout."
        )

    # ------------------------------------------------------------------------------------------------- config
    def text_config(self):
        # Not `get_text_config(decoder=True)`: on flat encoder-decoder configs (BART) it returns a copy whose
        # `decoder_*` fields were renamed, and reads back class defaults for them.
        get_text_config = getattr(self.config, "get_text_config", None)
        if callable(get_text_config):
            try:
                return get_text_config()
            except ValueError:  # several nested text configs: read the top-level one
                return self.config
        return getattr(self.config, "text_config", None) or self.config

    @staticmethod
    def first_int(configs, keys) -> int | None:
        for config in configs:
            for key in keys:
                value = getattr(config, key, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    # ------------------------------------------------------------------------------------------------- search
    def path_of(self, target: nn.Module, what: str) -> str:
        for name, module in self.model.named_modules():
            if module is target:
                return name
        raise self.fail(f"the {what} ({type(target).__name__}) is not a submodule of the model")

    def find_blocks(self, num_layers: int | None, is_encoder_decoder: bool, embed_path: str) -> tuple[str, nn.Module]:
        candidates = []
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if num_layers is not None and len(module) != num_layers:
                continue
            if len({type(block) for block in module}) != 1:
                continue
            if not any(_is_linear(sub) for sub in module[0].modules()):
                continue
            candidates.append((name, module))
        # Drop lists nested inside another candidate's blocks (e.g. T5's `block.0.layer`).
        candidates = [
            (name, module)
            for name, module in candidates
            if not any(other != name and name.startswith(other + ".") for other, _ in candidates)
        ]
        if is_encoder_decoder:
            decoder = [c for c in candidates if "decoder" in c[0].lower()]
            candidates = decoder or [c for c in candidates if "encoder" not in c[0].lower()]
        if len(candidates) > 1:
            embed_parent = embed_path.rpartition(".")[0]
            beside_embedding = [c for c in candidates if c[0].rpartition(".")[0] == embed_parent]
            candidates = beside_embedding or candidates
        if len(candidates) > 1 and num_layers is None:
            longest = max(len(module) for _, module in candidates)
            candidates = [c for c in candidates if len(c[1]) == longest]
        if not candidates:
            size = f"of length {num_layers} (the config's number of layers)" if num_layers else "of blocks"
            raise self.fail(f"no nn.ModuleList {size} holding identical blocks with linear layers was found")
        if len(candidates) > 1:
            logger.debug(
                "Several block lists fit %s: %s; using the first.", self.class_name, [c[0] for c in candidates]
            )
        return candidates[0]

    @staticmethod
    def ancestors(block: nn.Module, name: str) -> list[tuple[str, str]]:
        """(name component, class name) of every strict ancestor of `name` inside `block`, plus its own name."""
        parts = name.split(".")
        out = []
        for i in range(1, len(parts)):
            sub = block.get_submodule(".".join(parts[:i]))
            out.append((parts[i - 1].lower(), type(sub).__name__.lower()))
        out.append((parts[-1].lower(), ""))
        return out

    @staticmethod
    def mentions(ancestors: list[tuple[str, str]], hints: tuple[str, ...], skip_last: bool = True) -> bool:
        chain = ancestors[:-1] if skip_last else ancestors
        return any(hint in part for pair in chain for part in pair for hint in hints)

    # -------------------------------------------------------------------------------------------------- main
    def resolve(self) -> ModelLayout:
        model = self.model
        if self.config is None:
            raise self.fail("it has no `config`; only transformers PreTrainedModel instances are inspected")
        text_config = self.text_config()
        configs = (text_config, self.config)
        is_encoder_decoder = bool(getattr(self.config, "is_encoder_decoder", False))

        # Embedding and head, through the transformers API.
        get_in = getattr(model, "get_input_embeddings", None)
        get_out = getattr(model, "get_output_embeddings", None)
        embed = get_in() if callable(get_in) else None
        head = get_out() if callable(get_out) else None
        if embed is None:
            raise self.fail("get_input_embeddings() returned no input embedding")
        if head is None:
            raise self.fail("get_output_embeddings() returned no LM head (is it a model with a language-model head?)")
        embed_path = self.path_of(embed, "input embedding")
        lm_head_path = self.path_of(head, "LM head")

        hidden = self.first_int(configs, _HIDDEN_SIZE_KEYS) or getattr(embed, "embedding_dim", None)
        if not hidden:
            raise self.fail("the hidden size is neither in the config nor given by the input embedding")
        intermediate = self.first_int(configs, _INTERMEDIATE_SIZE_KEYS)
        layer_keys = _DECODER_LAYERS_KEYS if is_encoder_decoder else _LAYERS_KEYS
        num_layers = self.first_int(configs, layer_keys)

        blocks_path, blocks = self.find_blocks(num_layers, is_encoder_decoder, embed_path)
        block = blocks[0]
        linears = [(name, module) for name, module in block.named_modules() if name and _is_linear(module)]
        info = {name: self.ancestors(block, name) for name, _ in linears}
        in_attention = {name: self.mentions(info[name], _ATTENTION_HINTS) for name, _ in linears}
        shapes = {name: linear_shape(module) for name, module in linears}

        mlp_out_name = self.pick_mlp_out(linears, shapes, in_attention, info, hidden, intermediate)
        mlp_in_names = self.pick_mlp_in(linears, shapes, in_attention, hidden, mlp_out_name)
        attn_out_name = self.pick_attn_out(linears, shapes, in_attention, info, hidden)

        for index, other in enumerate(blocks):
            for name in (mlp_out_name, attn_out_name, *mlp_in_names):
                try:
                    other.get_submodule(name)
                except AttributeError:
                    raise self.fail(f"block {index} has no `{name}` although block 0 has (blocks differ)") from None

        final_norm_path = self.find_final_norm(blocks_path, blocks, hidden)
        return ModelLayout(
            model_type=self.model_type,
            is_encoder_decoder=is_encoder_decoder,
            blocks_path=blocks_path,
            num_layers=len(blocks),
            mlp_in_names=tuple(mlp_in_names),
            mlp_out_name=mlp_out_name,
            attn_out_name=attn_out_name,
            final_norm_path=final_norm_path,
            lm_head_path=lm_head_path,
            embed_path=embed_path,
            weights_transposed=isinstance(block.get_submodule(mlp_out_name), Conv1D),
        )

    def pick_mlp_out(self, linears, shapes, in_attention, info, hidden, intermediate) -> str:
        outside = [name for name, _ in linears if not in_attention[name] and shapes[name][0] == hidden]
        candidates = [name for name in outside if intermediate and shapes[name][1] == intermediate]
        if not candidates:
            candidates = [name for name in outside if shapes[name][1] != hidden]
        if len(candidates) > 1:
            candidates = [n for n in candidates if self.mentions(info[n], _MLP_HINTS)] or candidates
        if len(candidates) > 1:
            candidates = [n for n in candidates if n.rpartition(".")[2].lower() in _MLP_OUT_NAMES] or candidates
        if len(candidates) != 1:
            found = ", ".join(f"{n} {shapes[n]}" for n in candidates) or "none"
            raise self.fail(
                f"expected exactly one MLP output projection (a linear layer outside attention mapping "
                f"intermediate -> hidden={hidden}) in block 0, found {found}"
            )
        return candidates[0]

    def pick_mlp_in(self, linears, shapes, in_attention, hidden, mlp_out_name) -> list[str]:
        intermediate = shapes[mlp_out_name][1]
        parent = mlp_out_name.rpartition(".")[0]
        names = [
            name
            for name, _ in linears
            if not in_attention[name]
            and name.rpartition(".")[0] == parent
            and shapes[name][1] == hidden
            and shapes[name][0] in (intermediate, 2 * intermediate)
        ]
        if not names:
            raise self.fail(
                f"no MLP input projection (hidden={hidden} -> intermediate={intermediate}, or twice that when fused) "
                f"was found next to the MLP output projection `{mlp_out_name}`"
            )
        return names

    def pick_attn_out(self, linears, shapes, in_attention, info, hidden) -> str:
        self_attention = [
            name for name, _ in linears if in_attention[name] and not self.mentions(info[name], _CROSS_ATTENTION_HINTS)
        ]
        if not self_attention:
            raise self.fail("no linear layer inside a self-attention submodule was found in block 0")
        # Only the first self-attention submodule of the block (its top-level child holding attention linears).
        first = self_attention[0].split(".")[0]
        candidates = [n for n in self_attention if n.split(".")[0] == first and shapes[n][0] == hidden]
        named = [n for n in candidates if n.rpartition(".")[2].lower() in _ATTN_OUT_NAMES]
        candidates = named or candidates
        if not candidates:
            raise self.fail(f"no attention output projection (a linear layer in attention with output size {hidden})")
        return candidates[-1]

    def find_final_norm(self, blocks_path: str, blocks: nn.Module, hidden: int) -> str:
        parent_path, _, list_name = blocks_path.rpartition(".")
        parent = self.model.get_submodule(parent_path)

        def is_norm(name: str, module: nn.Module) -> bool:
            # Norms of the embeddings (BART's `layernorm_embedding`) come before the blocks, whatever their position.
            if "norm" not in type(module).__name__.lower() or "emb" in name.rpartition(".")[2].lower():
                return False
            weight = getattr(module, "weight", None)
            return not isinstance(weight, torch.Tensor) or weight.shape[-1] == hidden

        children = list(parent.named_children())
        position = [name for name, _ in children].index(list_name)
        after = [name for name, module in children[position + 1 :] if is_norm(name, module)]
        before = [name for name, module in children[:position] if is_norm(name, module)]
        if after or before:
            name = after[0] if after else before[-1]
            return f"{parent_path}.{name}" if parent_path else name
        # Fall back on the first norm registered after the blocks anywhere in the model.
        seen_blocks = False
        for name, module in self.model.named_modules():
            if module is blocks:
                seen_blocks = True
            elif seen_blocks and not name.startswith(blocks_path + ".") and is_norm(name, module):
                return name
        raise self.fail(f"no final norm (a *Norm module of size {hidden} next to `{blocks_path}`) was found")


def _detect_layout(model: nn.Module) -> ModelLayout:
    return _Resolver(model).resolve()


__all__ = [
    "ModelLayout",
    "linear_shape",
    "register_architecture",
    "resolve_layout",
    "unregister_architecture",
    "weight_as_out_in",
]
