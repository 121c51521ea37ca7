"""Export low-rank edits as standard PEFT LoRA adapters.

A :class:`~hf_knowedit.deltas.LowRankDelta` `ΔW = up @ down` is exactly a LoRA adapter with `lora_B = up`,
`lora_A = down` and scaling 1 (`lora_alpha = r`). Ranks differ between layers (ROME: the number of requests; MEMIT:
at most the batch size per layer), so each module gets its own `rank_pattern` / `alpha_pattern` entry. GPT-2's
`Conv1D` modules need `fan_in_fan_out=True`. The result loads with `peft.PeftModel.from_pretrained(base, directory)`
and computes the same outputs as the `EditedModel`.
"""

import os
from pathlib import Path

import torch

from .deltas import LowRankDelta
from .errors import EditConfigError
from .hub import atomic_directory
from .utils import get_logger, write_json


logger = get_logger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def lora_factors(edited_model, edit_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module path: (lora_B, lora_A)}` of the edit `edit_name`; several low-rank components are concatenated."""
    edit = edited_model.get_edit(edit_name)
    factors = {}
    for path, components in edit.components.items():
        ups, downs = [], []
        for component in components:
            if not isinstance(component, LowRankDelta):
                raise EditConfigError(
                    f"The edit {edit_name!r} holds a {component.kind} component at {path}; only low-rank edits "
                    "(ROME, MEMIT, AlphaEdit) export exactly as a LoRA adapter. Save it with save_pretrained instead."
                )
            ups.append(component.up)
            downs.append(component.down)
        factors[path] = (torch.cat(ups, dim=1).float().contiguous(), torch.cat(downs, dim=0).float().contiguous())
    return factors


def export_peft_lora(edited_model, directory: str | os.PathLike, edit_name: str = "default") -> Path:
    """Write the edit `edit_name` as a PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`).

    Example:

    ```python
    >>> import tempfile
    >>> from hf_knowedit import EditedModel, EditRequest
    >>> from hf_knowedit.methods.rome import ROMEConfig
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> edited = EditedModel(tiny_model("llama"), tiny_tokenizer())
    >>> request = EditRequest(prompt="{} plays", subject="Messi", target_new="tennis")
    >>> edited = edited.add_edits(ROMEConfig(v_num_grad_steps=2, mom2_adjustment=False), [request])
    >>> directory = export_peft_lora(edited, tempfile.mkdtemp())
    >>> sorted(p.name for p in directory.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']

    ```
    """
    from safetensors.torch import save_file

    factors = lora_factors(edited_model, edit_name)
    if not factors:
        raise EditConfigError(f"The edit {edit_name!r} changes no module; there is nothing to export.")
    base = edited_model.base_model
    ranks = {path: int(b.shape[1]) for path, (b, _) in factors.items()}
    max_rank = max(ranks.values())
    tensors = {}  # fp32, as the edit computes them (PEFT keeps adapter weights in fp32 by default)
    for path, (b, a) in factors.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.cpu()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.cpu()
    config = edited_model.get_edit(edit_name).config
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.base_model_name_or_path or getattr(base, "name_or_path", None),
        "revision": config.revision,
        "r": max_rank,
        "lora_alpha": max_rank,
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "target_modules": sorted(factors),
        "fan_in_fan_out": bool(edited_model.layout.weights_transposed),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with atomic_directory(Path(directory)) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(staging / ADAPTER_CONFIG_NAME, adapter_config, stamp=False)  # PEFT's format: no extra keys
    logger.info("Exported edit %r as a LoRA adapter (ranks %s) to %s", edit_name, sorted(set(ranks.values())),
                directory)
    return Path(directory)


__all__ = ["export_peft_lora", "lora_factors"]
