"""`EditedModel`: a base model with named, switchable, saveable edits, in the manner of `peft.PeftModel`."""

import contextlib
import copy
import functools
import hashlib
import inspect
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import artifacts
from .architectures import resolve_layout
from .config import CONFIG_NAME, EditConfig, get_editor_class
from .deltas import EditComponent, WeightDelta, first_tensor, merge_weight_delta
from .devices import input_device, is_offloaded, materialized_weight, named_state_tensors
from .errors import ArtifactError, EditConfigError, EditNotFoundError, EditRequestError, OffloadedWeightsError
from .fingerprint import check_fingerprint, model_fingerprint, update_digest
from .hub import resolve_artifact_dir
from .precision import HALF_PRECISION, check_edit_effect, check_merge_effect, model_dtype, target_log_probs
from .requests import EditRequest, as_requests
from .utils import get_logger


logger = get_logger(__name__)


@dataclass
class Edit:
    """One named edit: its config, its requests, and the components it adds at each module path."""

    config: EditConfig
    requests: list[EditRequest]
    components: dict[str, list[EditComponent]]
    fingerprint: dict
    stats: dict = field(default_factory=dict)

    def num_bytes(self) -> int:
        return sum(c.num_bytes() for comps in self.components.values() for c in comps)


# -- model-level components ------------------------------------------------------------------------------------------
# Side-memory editors that decide per prompt (SERAC, IKE) cannot be module hooks: they sit at the pseudo module path
# MODEL_ROOT and EditedModel.forward / generate ask them, prompt by prompt, for a context to put before the prompt.
MODEL_ROOT = ""


class ModelComponent(EditComponent):
    """A component of the whole model call, stored at the pseudo module path `""` (:data:`MODEL_ROOT`).

    While it is active, :meth:`EditedModel.forward` and :meth:`EditedModel.generate` decode every prompt of the batch
    and call :meth:`route`; a prompt that gets a context text is answered by the model conditioned on
    `context + prompt` (its logits are read back at the prompt's own positions), the others by the model as it is.
    When no prompt of a batch is routed, the call is the plain model call, bit for bit. Such an edit is fingerprinted
    by the first block's MLP output weight, so that an artifact made on another base model is refused.
    """

    kind = "model_component"
    # whether its contexts are long texts shared by many prompts (IKE's demonstrations): scorers then batch the prompts
    # of one context together (`EditedModel.context_groups`) and the model runs each context once per batch
    shares_long_contexts: ClassVar[bool] = False

    def route(self, edited_model, prompts: list[str]) -> list[str | None]:
        """For each prompt text, the context to put before it, or `None` to leave the prompt as it is."""
        raise NotImplementedError

    def forward(self, module_input, module_output):
        raise TypeError(f"A {self.kind} component routes whole prompts; it is not a module hook.")


# decoder-only model types whose routed prompts may share their contexts' cache (`EditedModel._shared_context_logits`):
# plain attention caches, checked by the tests on tiny models of each; other models run a copy of the context per prompt
SHARED_CONTEXT_MODEL_TYPES = frozenset({"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma",
                                        "gemma3_text", "opt", "phi3"})


def _pad_rows(rows, pad: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded with `pad` to the longest (on the left for generation), and their attention mask."""
    width = max(len(row) for row in rows)
    padding = [[pad] * (width - len(row)) for row in rows]
    ids = [(p + list(row)) if left else (list(row) + p) for row, p in zip(rows, padding, strict=True)]
    ones = [([0] * len(p) + [1] * len(row)) if left else ([1] * len(row) + [0] * len(p))
            for row, p in zip(rows, padding, strict=True)]
    return torch.tensor(ids, device=device), torch.tensor(ones, device=device)


class EditedModel(nn.Module):
    """A pretrained model with knowledge edits applied beside its weights.

    Edits are components hooked onto the modules they change; the base weights stay untouched (unless
    :meth:`merge_edits` is called), so :meth:`disable_edits` and :meth:`unload` give back the original model bit for
    bit. Attributes the wrapper does not define are read from the base model.

    Args:
        model (`transformers.PreTrainedModel`):
            The base model.
        tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*, defaults to `None`):
            Its tokenizer; methods and metrics need one.

    Example:

    ```python
    >>> from hf_knowedit import EditedModel, FTConfig, EditRequest
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> edited = EditedModel(tiny_model("gpt2"), tiny_tokenizer())
    >>> request = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
    >>> edited = edited.add_edits(FTConfig(num_steps=2), [request])
    >>> edited.edit_names
    ['default']

    ```
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__()
        if isinstance(model, EditedModel):
            raise TypeError("The model is already an EditedModel; call add_edits on it instead of wrapping it again.")
        self.base_model = model
        self.tokenizer = tokenizer
        self._edits: dict[str, Edit] = {}
        self._active: list[str] = []
        self._disabled = False
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._pending: dict[str, list[EditComponent]] = {}
        self._originals: dict[str, torch.Tensor] = {}  # weights as they were before merge_edits
        self._merged: list[str] = []
        self.check_precision = True  # on fp16/bf16 models, warn when rounding swallows an edit (see precision.py)

    # -- pass-through ----------------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        routed = self._routed_call(args, kwargs, generate=False)
        return routed if routed is not None else self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        routed = self._routed_call(args, kwargs, generate=True)
        return routed if routed is not None else self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def layout(self):
        """The resolved structure of the base model (blocks, MLP projections, norm, head)."""
        return resolve_layout(self.base_model)

    # -- edits -----------------------------------------------------------------------------------------------------
    @property
    def edit_names(self) -> list[str]:
        return list(self._edits)

    @property
    def active_edits(self) -> list[str]:
        return list(self._active)

    def get_edit(self, edit_name: str = "default") -> Edit:
        self._check_names([edit_name])
        return self._edits[edit_name]

    def add_edits(
        self,
        config: EditConfig,
        requests: EditRequest | dict | Iterable[EditRequest | dict],
        edit_name: str = "default",
        tokenizer=None,
    ) -> "EditedModel":
        """Compute the edit of `requests` with the method of `config` and apply it under `edit_name`.

        When `edit_name` exists already and was made with an equal config, the new edit is stacked onto it
        (sequential editing); otherwise a new named edit is created and activated. If the method fails, the model is
        left exactly as it was. Returns `self`.
        """
        if not isinstance(config, EditConfig):
            raise EditConfigError(f"config must be an EditConfig (e.g. FTConfig()), got {type(config).__name__}.")
        if not isinstance(edit_name, str) or not edit_name or "/" in edit_name or edit_name.startswith("."):
            raise EditConfigError(f"edit_name must be a plain non-empty name, got {edit_name!r}.")
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if self.tokenizer is None:
            raise EditRequestError(
                "Editing needs the model's tokenizer: pass tokenizer= to get_edited_model or add_edits."
            )
        config = copy.deepcopy(config)  # the base model's name is filled in below; the caller's object stays as given
        existing = self._edits.get(edit_name)
        if existing is not None and _method_settings(existing.config) != _method_settings(config):
            raise EditConfigError(
                f"The edit {edit_name!r} exists with another config ({existing.config.edit_type}); give a new "
                "edit_name to add an edit with different settings."
            )
        requests = as_requests(requests)
        editor = get_editor_class(config.edit_type)(config)
        editor.check_model(self)
        start = time.perf_counter()
        with self._editing_state():
            components = editor.compute_components(self, requests)
        seconds = time.perf_counter() - start
        components = self._validate_components(components)
        half = self._half_precision_dtype() if config.raises_target_new else None
        before = target_log_probs(self, self.tokenizer, requests) if half else None
        fingerprint = model_fingerprint(self.base_model, self._original_tensors(components))
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = fingerprint["name_or_path"]
        if config.revision is None:
            config.revision = fingerprint["revision"]
        self._install(edit_name, config, requests, components, fingerprint)
        stats = self._edits[edit_name].stats
        stats.update(editor.stats)
        stats["edit_seconds"] = stats.get("edit_seconds", 0.0) + seconds
        stats["num_edit_calls"] = stats.get("num_edit_calls", 0) + 1
        if half:
            after = target_log_probs(self, self.tokenizer, requests)
            stats["precision_check"] = check_edit_effect(half, requests, before, after, edit_name)
        logger.info("Edit %r: %d request(s) in %.2f s", edit_name, len(requests), seconds)
        return self

    def set_active_edits(self, edit_names: str | list[str]) -> None:
        """Make exactly these edits active, in this order."""
        names = [edit_names] if isinstance(edit_names, str) else list(edit_names)
        self._check_names(names)
        with self._unmerged():
            self._active = names

    def delete_edit(self, edit_name: str) -> None:
        """Remove a named edit from the model."""
        self._check_names([edit_name])
        with self._unmerged():
            del self._edits[edit_name]
            self._active = [n for n in self._active if n != edit_name]
        self._sync_hooks()

    @contextlib.contextmanager
    def disable_edits(self):
        """Context manager in which the model computes exactly as the base model did."""
        if self._disabled:
            yield
            return
        swapped = self._swap_originals() if self._merged else {}
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for path, merged_weight in swapped.items():
                with torch.no_grad():
                    self.base_model.get_submodule(path).weight.copy_(merged_weight)

    # -- merging ---------------------------------------------------------------------------------------------------
    def merge_edits(self) -> None:
        """Write the active weight deltas into the base weights (faster inference); :meth:`unmerge_edits` undoes it.

        The original weights are kept aside, so unmerging and :meth:`unload` stay bit-exact.
        """
        if self._merged:
            return
        deltas = self._active_weight_deltas()
        self._check_mergeable(deltas)
        half = self._half_precision_dtype() if deltas else None
        requests = [r for name in self._active for r in self._edits[name].requests]
        unmerged = target_log_probs(self, self.tokenizer, requests) if half else None
        for path, delta in deltas.items():
            module = self.base_model.get_submodule(path)
            self._originals.setdefault(path, module.weight.detach().clone())
            merge_weight_delta(module, delta, self.layout.weights_transposed)
        self._merged = list(self._active)
        if half:
            merged = target_log_probs(self, self.tokenizer, requests)
            with self.disable_edits():
                unedited = target_log_probs(self, self.tokenizer, requests)
            record = check_merge_effect(half, requests, unedited, unmerged, merged)
            for name in self._merged:
                self._edits[name].stats["merge_precision_check"] = record

    def unmerge_edits(self) -> None:
        """Restore the original weights after :meth:`merge_edits`."""
        for path, original in self._originals.items():
            with torch.no_grad():
                self.base_model.get_submodule(path).weight.copy_(original)
        self._originals.clear()
        self._merged = []

    def merge_and_unload(self) -> nn.Module:
        """Merge the active edits into the weights for good and return the base model, with no hooks left."""
        side = [n for n in self._active for comps in self._edits[n].components.values() for c in comps
                if not isinstance(c, WeightDelta)]
        if side:
            raise EditConfigError(
                f"The edits {sorted(set(side))} add side modules, which cannot be merged into weights. Keep the "
                "EditedModel, or save the edit and load it where needed."
            )
        deltas = self._active_weight_deltas()
        self._check_mergeable(deltas)
        self.unmerge_edits()
        half = self._half_precision_dtype() if deltas else None
        if half:
            requests = [r for name in self._active for r in self._edits[name].requests]
            unmerged = target_log_probs(self, self.tokenizer, requests)
            with self.disable_edits():
                unedited = target_log_probs(self, self.tokenizer, requests)
        for path, delta in deltas.items():
            merge_weight_delta(self.base_model.get_submodule(path), delta, self.layout.weights_transposed)
        model = self._detach()
        if half:
            check_merge_effect(half, requests, unedited, unmerged, target_log_probs(model, self.tokenizer, requests))
        return model

    def _half_precision_dtype(self) -> torch.dtype | None:
        """The model's dtype when it is fp16/bf16 and the precision check is on (and possible), else `None`."""
        if not self.check_precision or self.tokenizer is None:
            return None
        dtype = model_dtype(self.base_model)
        return dtype if dtype in HALF_PRECISION else None

    def _check_mergeable(self, paths) -> None:
        offloaded = [path for path in paths if is_offloaded(self.base_model.get_submodule(path))]
        if offloaded:
            raise OffloadedWeightsError(
                f"The edited modules {offloaded} are offloaded by accelerate (their weights live on CPU or disk and "
                "are loaded for each forward pass), so the edit cannot be merged into them. The edit works unmerged, "
                "through hooks; to merge, load the model with those layers on a device (a device_map without "
                "'cpu'/'disk' offloading for them)."
            )

    def unload(self) -> nn.Module:
        """Remove every edit and return the base model with its original weights, bit for bit."""
        self.unmerge_edits()
        return self._detach()

    def _detach(self) -> nn.Module:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._edits.clear()
        self._active = []
        return self.base_model

    # -- saving and loading ----------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        edit_names: list[str] | None = None,
        as_peft_lora: bool = False,
        **kwargs,
    ) -> dict[str, int]:
        """Save edits as artifacts: `default` at the root of `save_directory`, other names in subfolders.

        Writes `edit_config.json`, `edit_weights.safetensors`, `edit_requests.jsonl` and a `README.md` model card per
        edit, atomically: a failure leaves no half-written directory. Returns the bytes written per edit.

        With `as_peft_lora=True`, one low-rank edit (ROME, MEMIT, AlphaEdit) is written instead as a standard PEFT LoRA
        adapter that `peft.PeftModel.from_pretrained(base, save_directory)` loads with the same outputs.
        """
        names = list(self._edits) if edit_names is None else list(edit_names)
        self._check_names(names)
        if not names:
            raise EditNotFoundError("This model has no edits to save; add one with add_edits first.")
        if as_peft_lora:
            from .peft_export import export_peft_lora

            if len(names) != 1:
                raise EditConfigError(
                    f"as_peft_lora=True exports one edit as one adapter; pass edit_names=[...] with one of {names}."
                )
            directory = export_peft_lora(self, save_directory, edit_name=names[0])
            return {names[0]: sum(f.stat().st_size for f in directory.iterdir() if f.is_file())}
        return artifacts.save_edits(self, names, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, edit_names: list[str] | None = None, private: bool | None = None,
                    token: str | bool | None = None, commit_message: str = "Upload edit with hf-knowedit", **kwargs):
        """Save the edits into a temporary directory and upload them to the Hub repo `repo_id`."""
        import tempfile

        from .hub import push_folder_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "edit"
            self.save_pretrained(folder, edit_names=edit_names)
            return push_folder_to_hub(folder, repo_id, private=private, token=token,
                                      commit_message=commit_message, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        edit_id: str | os.PathLike,
        edit_name: str = "default",
        tokenizer=None,
        subfolder: str | None = None,
        **hub_kwargs,
    ) -> "EditedModel":
        """Load a saved edit (local directory or Hub repo id) onto `model`, checking it is the right base model."""
        edited = model if isinstance(model, EditedModel) else cls(model, tokenizer)
        if tokenizer is not None:
            edited.tokenizer = tokenizer
        edited.load_edit(edit_id, edit_name=edit_name, subfolder=subfolder, **hub_kwargs)
        return edited

    def load_edit(self, edit_id: str | os.PathLike, edit_name: str = "default", subfolder: str | None = None,
                  **hub_kwargs) -> None:
        """Load one saved edit under `edit_name` and activate it."""
        if edit_name in self._edits:
            raise EditConfigError(f"An edit named {edit_name!r} exists already; load under another edit_name.")
        if subfolder is None and edit_name != "default":
            root = resolve_artifact_dir(edit_id, **hub_kwargs)
            if (root / edit_name / CONFIG_NAME).is_file():
                subfolder = edit_name
        directory = resolve_artifact_dir(edit_id, subfolder=subfolder, **hub_kwargs)
        config, components, requests, fingerprint, stats = artifacts.load_edit_dir(directory)
        # The fingerprint first: an edit made for another architecture is a base-model mismatch, not a broken file.
        present = [path for path in components if _has_submodule(self.base_model, path)]
        check_fingerprint(fingerprint, self.base_model, self._original_tensors(present), what=f"edit {edit_id}")
        for path in components:
            self._module_or_raise(path, ArtifactError)
        self._check_component_shapes(components)
        self._install(edit_name, config, requests, components, fingerprint)
        self._edits[edit_name].stats.update(stats)

    # -- internals -------------------------------------------------------------------------------------------------
    def _check_names(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self._edits]
        if missing:
            raise EditNotFoundError(f"No edit named {missing}; this model has {self.edit_names}.")

    def _module_or_raise(self, path: str, error_cls=EditConfigError) -> nn.Module:
        try:
            return self.base_model.get_submodule(path)
        except AttributeError:
            raise error_cls(
                f"The edit targets the module {path!r}, which {type(self.base_model).__name__} does not have."
            ) from None

    def _validate_components(self, components: dict) -> dict[str, list[EditComponent]]:
        result = {}
        for path, value in components.items():
            comps = list(value) if isinstance(value, (list, tuple)) else [value]
            self._module_or_raise(path)
            for comp in comps:
                comp.check_finite(path)
            result[path] = comps
        self._check_component_shapes(result)
        return result

    def _check_component_shapes(self, components: dict[str, list[EditComponent]]) -> None:
        from .architectures import linear_shape

        for path, comps in components.items():
            module = self.base_model.get_submodule(path)
            for comp in comps:
                check_compatible = getattr(comp, "check_compatible", None)  # side modules check their own shapes
                if check_compatible is not None:
                    check_compatible(self, path)
                if isinstance(comp, WeightDelta) and tuple(comp.shape) != tuple(linear_shape(module)):
                    raise ArtifactError(
                        f"The {comp.kind} delta for {path} has shape {tuple(comp.shape)}, but the module's weight is "
                        f"{tuple(linear_shape(module))} (out, in): the edit was made for another model."
                    )

    def _original_tensors(self, components) -> dict[str, torch.Tensor]:
        tensors = {}
        for path in components:
            if path == MODEL_ROOT:  # a model-level component depends on the whole model: fingerprint a weight of it
                first = self.layout.mlp_out_path(0)
                original = self._originals.get(first)
                tensors[f"{first}.weight"] = (
                    original if original is not None else materialized_weight(self.base_model.get_submodule(first)))
                continue
            module = self.base_model.get_submodule(path)
            for name, _ in module.named_parameters():
                owner_path, _, leaf = name.rpartition(".")
                value = self._originals.get(path) if name == "weight" else None
                tensors[f"{path}.{name}"] = (
                    value if value is not None else materialized_weight(module.get_submodule(owner_path), leaf))
        return tensors

    def _install(self, edit_name, config, requests, components, fingerprint) -> None:
        with self._unmerged():
            edit = self._edits.get(edit_name)
            if edit is None:
                self._edits[edit_name] = Edit(config, list(requests), components, fingerprint)
                self._active.append(edit_name)
            else:
                for path, comps in components.items():
                    stack = edit.components.setdefault(path, [])
                    for comp in comps:
                        combined = stack[-1].combine(comp) if stack else None
                        if combined is not None:
                            stack[-1] = combined
                        else:
                            stack.append(comp)
                edit.requests.extend(requests)
                edit.fingerprint["tensors"].update(fingerprint["tensors"])
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        needed = {path for edit in self._edits.values() for path in edit.components if path != MODEL_ROOT}
        for path in list(self._hooks):
            if path not in needed:
                self._hooks.pop(path).remove()
        for path in sorted(needed | set(self._pending)):
            if path not in self._hooks:
                module = self.base_model.get_submodule(path)
                self._hooks[path] = module.register_forward_hook(self._make_hook(path), with_kwargs=True)

    def _make_hook(self, path: str):
        def hook(module, args, kwargs, output):
            if self._disabled:
                return None
            # Weight deltas of merged edits are in the weights already; their side modules still run here.
            comps = [c for name in self._active for c in self._edits[name].components.get(path, ())
                     if name not in self._merged or not isinstance(c, WeightDelta)]
            comps += self._pending.get(path, [])
            if not comps:
                return None
            module_input = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            device = first_tensor(module_input).device
            for comp in comps:
                if comp.device != device:
                    comp.to(device)
                output = comp(module_input, output)
            return output

        return hook

    # -- model-level routing (see ModelComponent) ---------------------------------------------------------------------
    def _routers(self) -> list:
        """The active model-level components (SERAC, IKE), which route whole prompts."""
        if self._disabled:
            return []
        return [c for name in self._active for c in self._edits[name].components.get(MODEL_ROOT, ())]

    @property
    def routes_prompts(self) -> bool:
        """Whether an active model-level component routes whole prompts, so that a forward pass of the edited model
        is not a forward pass of the hooked base model."""
        return bool(self._routers())

    def routed_contexts(self, prompts: list[str]) -> list[str | None]:
        """The context text the active model-level components put before each prompt (`None`: the prompt is left as
        it is); the first component that routes a prompt decides."""
        contexts: list[str | None] = [None] * len(prompts)
        for router in self._routers():
            device = input_device(self.base_model)
            if router.device != device:
                router.to(device)
            for i, context in enumerate(router.route(self, prompts)):
                contexts[i] = contexts[i] if contexts[i] is not None else context
        return contexts

    def context_groups(self, prompts: list[str]) -> list[str] | None:
        """A key per prompt that groups the prompts sharing a long context (`""` for none), for a scorer to batch them
        together so that each context is run once per batch; `None` when no active component has such contexts."""
        if not any(router.shares_long_contexts for router in self._routers()):
            return None
        return [context or "" for context in self.routed_contexts(prompts)]

    def _routed_call(self, args, kwargs, generate: bool):
        """Run the call with each prompt routed by the active model-level components, or `None` when none applies."""
        routers = self._routers()
        kwargs = dict(kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        if not routers or not isinstance(input_ids, torch.Tensor) or kwargs.get("inputs_embeds") is not None:
            return None
        if kwargs.get("past_key_values") is not None and not generate:
            raise EditConfigError(
                "This model has model-level edits (SERAC, IKE), which route whole prompts: call it on full prompts "
                "or use generate(), not with past_key_values."
            )
        if self.tokenizer is None:
            raise EditRequestError("Model-level edits need the model's tokenizer: pass tokenizer= to EditedModel.")
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if mask is None else mask
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask, strict=True)]
        contexts = self.routed_contexts(self.tokenizer.batch_decode(rows, skip_special_tokens=True))
        if all(c is None for c in contexts):
            return None
        bos = self.tokenizer.bos_token_id
        new_rows, offsets = [], []  # offsets: (tokens kept before the context, context length)
        for row, context in zip(rows, contexts, strict=True):
            ctx = [] if context is None else self.tokenizer(context, add_special_tokens=False)["input_ids"]
            keep = 1 if row and bos is not None and row[0] == bos else 0
            new_rows.append(row[:keep] + ctx + row[keep:])
            offsets.append((keep, len(ctx)))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        encoder_decoder = bool(getattr(self.base_model.config, "is_encoder_decoder", False))
        for name in ("position_ids", "token_type_ids", "cache_position"):
            kwargs.pop(name, None)
        if not generate and not encoder_decoder:
            logits = self._shared_context_logits(rows, new_rows, offsets, mask, pad, kwargs)
            if logits is not None:
                return self._routed_output(logits, kwargs.get("labels"), False, CausalLMOutputWithPast)
        device = input_ids.device
        new_ids, new_mask = _pad_rows(new_rows, pad, device, left=generate and not encoder_decoder)
        width = new_ids.shape[1]
        if generate:
            out = self.base_model.generate(input_ids=new_ids, attention_mask=new_mask, **kwargs)
            if encoder_decoder:
                return out
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            sequences = torch.cat([input_ids, sequences[:, width:]], dim=1)
            if isinstance(out, torch.Tensor):
                return sequences
            out.sequences = sequences
            return out
        labels = kwargs.pop("labels", None)
        kwargs["return_dict"] = True
        kept = None if encoder_decoder or "logits_to_keep" in kwargs else self._prompt_positions(offsets, width)
        if kept is not None:
            kwargs["logits_to_keep"] = kept.to(device)
        out = self.base_model(input_ids=new_ids, attention_mask=new_mask, **kwargs)
        logits = out.logits
        if not encoder_decoder:  # read the logits back at the prompt's own positions; padding gets zeros
            where = torch.arange(width) if kept is None else torch.full((width,), -1).index_put_(
                (kept,), torch.arange(len(kept)))  # position in the routed row -> row of `logits`
            routed = logits.new_zeros(*input_ids.shape, logits.shape[-1])
            for i, (keep, ctx_len) in enumerate(offsets):
                n = len(rows[i])
                source = where[torch.cat([torch.arange(keep), torch.arange(keep + ctx_len, n + ctx_len)])]
                routed[i, mask[i].bool()] = logits[i, source.to(device)]
            logits = routed
        return self._routed_output(logits, labels, encoder_decoder, type(out))

    @staticmethod
    def _routed_output(logits, labels, encoder_decoder: bool, output_class):
        """The output of a routed call (an `output_class`): its logits, and the loss on `labels` when given."""
        loss = None
        if labels is not None:
            aligned, targets = (logits, labels) if encoder_decoder else (logits[:, :-1], labels[:, 1:])
            loss = nn.functional.cross_entropy(aligned.reshape(-1, aligned.shape[-1]).float(),
                                               targets.reshape(-1), ignore_index=-100)
        return output_class(loss=loss, logits=logits)

    def _shared_context_logits(self, rows, new_rows, offsets, mask, pad, kwargs) -> torch.Tensor | None:
        """The logits of a routed batch of a decoder-only model where some rows share a context, each context run once:
        the distinct contexts (each with the tokens kept before it, a BOS) in one forward pass that keeps their keys
        and values, then every routed row's own tokens after its context's cache (positions continued, the padding of
        the contexts masked), and the rows without a context as they are. Equal to running each row with its context
        up to float rounding, for a fraction of the time when prompts share long contexts (IKE's demonstrations).
        `None` when no context is shared or the model cannot take the cache and positions this needs."""
        routed = [i for i, (_, ctx_len) in enumerate(offsets) if ctx_len]
        prefix_of = [tuple(new_rows[i][: sum(offsets[i])]) for i in routed]  # the kept tokens and the context
        group = {prefix: g for g, prefix in enumerate(dict.fromkeys(prefix_of))}
        if (len(group) == len(routed) or set(kwargs) - {"return_dict", "labels", "use_cache"}
                or any(len(rows[i]) == offsets[i][0] for i in routed)):  # nothing shared, other outputs, no prompt
            return None
        config = self.base_model.config
        if (config.model_type not in SHARED_CONTEXT_MODEL_TYPES
                or not self._forward_accepts("position_ids", "past_key_values", "logits_to_keep")):
            return None
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or ["sliding_attention"]
        if window is not None and "sliding_attention" in layer_types and max(map(len, new_rows)) > window:
            # the window would slide over the padding of the shorter contexts
            return None
        device = mask.device
        context_ids, context_mask = _pad_rows(list(group), pad, device)
        lengths = context_mask.sum(-1)
        first = self.base_model(input_ids=context_ids, attention_mask=context_mask,
                                position_ids=torch.arange(context_ids.shape[1], device=device).expand_as(context_ids),
                                use_cache=True, logits_to_keep=torch.tensor([0], device=device), return_dict=True)
        cache = first.past_key_values
        of_row = torch.tensor([group[prefix] for prefix in prefix_of], device=device)
        cache.reorder_cache(of_row)
        own_ids, own_mask = _pad_rows([rows[i][offsets[i][0]:] for i in routed], pad, device)
        positions = lengths[of_row].unsqueeze(-1) + torch.arange(own_ids.shape[1], device=device)
        second = self.base_model(input_ids=own_ids, attention_mask=torch.cat([context_mask[of_row], own_mask], -1),
                                 position_ids=positions, past_key_values=cache, use_cache=True, return_dict=True)
        plain = sorted(set(range(len(rows))) - set(routed))
        logits = second.logits.new_zeros(*mask.shape, second.logits.shape[-1])
        for k, i in enumerate(routed):
            keep = offsets[i][0]
            head = first.logits[of_row[k], :keep]  # the logits of the kept tokens (a BOS): before any context
            logits[i, mask[i].bool()] = torch.cat([head, second.logits[k, : len(rows[i]) - keep]])
        if plain:
            plain_ids, plain_mask = _pad_rows([rows[i] for i in plain], pad, device)
            out = self.base_model(input_ids=plain_ids, attention_mask=plain_mask, return_dict=True)
            for k, i in enumerate(plain):
                logits[i, mask[i].bool()] = out.logits[k, : len(rows[i])]
        return logits

    def _prompt_positions(self, offsets: list[tuple[int, int]], width: int) -> torch.Tensor | None:
        """The positions of routed rows (right-padded to `width`) that hold a prompt's own tokens, for the base model
        to compute logits at those only (`logits_to_keep`), not at the contexts': the output layer over a long
        context's positions costs as much memory as the logits of a whole batch of IKE's demonstrations (gigabytes)
        and a fifth of the time. `None` when every position is needed or the model cannot skip any."""
        start = min(keep + ctx_len for keep, ctx_len in offsets)  # the first prompt token after a context
        head = max(keep for keep, _ in offsets)  # the tokens kept before the contexts (a BOS)
        if start <= head or not self._forward_accepts("logits_to_keep"):
            return None
        return torch.cat([torch.arange(head), torch.arange(start, width)])

    def _forward_accepts(self, *names: str) -> bool:
        """Whether the base model's forward takes all these keyword arguments."""
        return set(names) <= set(inspect.signature(self.base_model.forward).parameters)

    def _active_weight_deltas(self) -> dict[str, torch.Tensor]:
        deltas: dict[str, torch.Tensor] = {}
        for name in self._active:
            for path, comps in self._edits[name].components.items():
                for comp in comps:
                    if isinstance(comp, WeightDelta):
                        delta = comp.delta_weight()
                        deltas[path] = deltas[path] + delta if path in deltas else delta
        return deltas

    def _swap_originals(self) -> dict[str, torch.Tensor]:
        swapped = {}
        for path, original in self._originals.items():
            weight = self.base_model.get_submodule(path).weight
            swapped[path] = weight.detach().clone()
            with torch.no_grad():
                weight.copy_(original)
        return swapped

    @contextlib.contextmanager
    def _unmerged(self):
        merged = bool(self._merged)
        if merged:
            self.unmerge_edits()
        try:
            yield
        finally:
            if merged:
                self.merge_edits()

    @contextlib.contextmanager
    def _editing_state(self):
        """Freeze the base parameters and evaluation mode while an editor runs; restore both, and the parameters'
        gradients as the caller left them, afterwards."""
        model = self.base_model
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        grads = {name: p.grad for name, p in model.named_parameters()}
        training = model.training
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            yield
        finally:
            self._pending.clear()
            self._sync_hooks()
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
                p.grad = grads[name]
            model.train(training)

    @contextlib.contextmanager
    def temporary_components(self, components: dict[str, EditComponent | list[EditComponent]]):
        """Apply `components` on top of the active edits inside the block (editors use it to train deltas)."""
        for path, value in components.items():
            self._module_or_raise(path)
            self._pending.setdefault(path, []).extend(value if isinstance(value, list) else [value])
        self._sync_hooks()
        try:
            yield
        finally:
            for path in components:
                self._pending.pop(path, None)
            self._sync_hooks()

    def computation_state(self, excluding: str | None = None) -> tuple[tuple, list]:
        """What a forward pass of the model depends on, for editors that reuse features computed in an earlier call.

        Returns `(key, objects)`. `key` holds the identity, storage and in-place version counter of every base
        parameter and buffer, the tokenizer, whether edits are disabled, which are merged, and the identity of every
        active component, in order, except those at the module `excluding` (which cannot change that module's
        inputs). Equal keys mean the same computation up to the inputs of `excluding`, provided the caller keeps
        `objects` (what the identities refer to) alive alongside the key, so that no identity is reused. Components
        are taken as immutable once applied, which is how editors make them. An inference tensor (made under
        `torch.inference_mode`) has no version counter: a model holding one never gives the same key twice.
        """
        tensors = [*self.base_model.parameters(), *self.base_model.buffers()]
        untracked = object()  # a fresh object, equal only to itself: no later key matches this one
        components = [c for name in self._active for path, comps in self._edits[name].components.items()
                      if path != excluding for c in comps]
        components += [c for path, comps in self._pending.items() if path != excluding for c in comps]
        key = (
            tuple((id(t), t.data_ptr(), untracked if t.is_inference() else t._version, t.dtype, t.device)
                  for t in tensors),
            tuple(id(c) for c in components),
            id(self.tokenizer), self._disabled, tuple(self._merged),
        )
        return key, [*tensors, *components, self.tokenizer]

    def state_digest(self) -> str:
        """A SHA-256 of everything a forward pass depends on, by content: the bytes, dtype and shape of every base
        parameter and buffer (by name), the tokenizer's vocabulary and special tokens, whether edits are disabled,
        which are merged, and every active and pending component's kind, settings and tensors, in order. Equal
        digests mean the same model in any process (see `hf_knowedit.resumable`); unlike :meth:`computation_state`
        it reads every tensor (0.8 s for the default model's 135M fp32 parameters on a CPU), those offloaded by
        accelerate included (one module at a time, through :func:`~hf_knowedit.devices.onloaded`)."""
        digest = hashlib.sha256()
        add_tensor = functools.partial(update_digest, digest)
        for name, tensor in named_state_tensors(self.base_model):  # offloaded modules read one at a time
            add_tensor(name, tensor)
        if self.tokenizer is not None:
            vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
            digest.update(json.dumps([sorted(vocab.items()), str(self.tokenizer.special_tokens_map),
                                      getattr(self.tokenizer, "padding_side", None)], default=str).encode())
        digest.update(json.dumps([self._disabled, self._merged, self._active]).encode())
        pending = [("(pending)", path, comps) for path, comps in sorted(self._pending.items())]
        active = [(name, path, comps) for name in self._active
                  for path, comps in self._edits[name].components.items()]
        for name, path, comps in active + pending:
            for number, component in enumerate(comps):
                prefix = f"{name}|{path}|{number}|{component.kind}"
                digest.update(f"{prefix}|{json.dumps(component.extra_meta(), sort_keys=True, default=str)}".encode())
                for tensor_name, tensor in sorted(component.state_dict().items()):
                    add_tensor(f"{prefix}.{tensor_name}", tensor)
        return digest.hexdigest()


def _method_settings(config: EditConfig) -> dict:
    """The fields of `config` that define the edit, without the base model's name and revision filled in later."""
    data = config.to_dict()
    data.pop("base_model_name_or_path", None)
    data.pop("revision", None)
    return data


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def get_edited_model(
    model: nn.Module | str,
    config: EditConfig,
    requests: EditRequest | dict | Iterable[EditRequest | dict],
    tokenizer=None,
    edit_name: str = "default",
) -> EditedModel:
    """Edit `model` with the method of `config` on `requests` and return the :class:`EditedModel`.

    `model` may be a `PreTrainedModel`, an `EditedModel` (the edit is added to it) or a model id or path (loaded with
    its tokenizer). With `tokenizer=None`, the tokenizer saved beside the model is loaded from local files.

    Example:

    ```python
    >>> from hf_knowedit import get_edited_model, FTConfig
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> request = {"prompt": "The capital of {} is", "subject": "Atlantis", "target_new": "Paris"}
    >>> edited = get_edited_model(tiny_model("llama"), FTConfig(num_steps=2), [request], tokenizer=tiny_tokenizer())
    >>> edited.active_edits
    ['default']

    ```
    """
    from .modeling import load_model_and_tokenizer, load_tokenizer_for

    if isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer = load_model_and_tokenizer(model)
        tokenizer = tokenizer or loaded_tokenizer
    if isinstance(model, EditedModel):
        return model.add_edits(config, requests, edit_name=edit_name, tokenizer=tokenizer)
    if tokenizer is None:
        tokenizer = load_tokenizer_for(model)
    return EditedModel(model, tokenizer).add_edits(config, requests, edit_name=edit_name)
