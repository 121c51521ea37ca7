"""Fingerprints of a base model: which model an artifact was made for, checked before it is applied.

A fingerprint holds the model's name, revision and type, and for every tensor an edit touches: its shape, a SHA-256
of its exact bytes, its norm, and 64 values sampled at fixed positions. An exact hash match proves identity; when the
hashes differ only because the same weights were loaded in another precision (fp32 vs bf16), the norms and samples
still agree within rounding and the artifact is accepted with a note in the log.
"""

import hashlib

import torch

from .errors import BaseModelMismatchError
from .utils import get_logger


logger = get_logger(__name__)
SAMPLE_SIZE = 64
# bf16 keeps 8 significant bits: values agree to about 0.4% across precisions.
SAMPLE_RTOL, SAMPLE_ATOL, NORM_RTOL = 2e-2, 1e-3, 1e-2


def tensor_bytes(tensor: torch.Tensor):
    """The exact bytes of `tensor`'s values in row-major order, as a NumPy `uint8` array on the CPU (any dtype,
    bfloat16 included).

    >>> tensor_bytes(torch.tensor([1], dtype=torch.int16)).tolist()
    [1, 0]
    """
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def update_digest(digest, name: str, tensor: torch.Tensor) -> None:
    """Feed `tensor` to the `hashlib` object `digest` by content: its name, dtype, shape and exact bytes."""
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor_bytes(tensor))


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of named tensors by content, in name order: equal for equal tensors however they were stored (the
    bytes of a safetensors file are not: its header's metadata is written in no fixed order).

    >>> one, other = {"b": torch.ones(2), "a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.ones(2)}
    >>> tensors_sha256(one) == tensors_sha256(other)
    True
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        update_digest(digest, name, tensors[name])
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> dict:
    """Shape, dtype, SHA-256 of the bytes, fp32 norm and 64 sampled values of `tensor`."""
    tensor = tensor.detach()
    flat = tensor.reshape(-1)
    raw = tensor_bytes(flat).tobytes()
    positions = torch.linspace(0, max(flat.numel() - 1, 0), min(SAMPLE_SIZE, flat.numel()), dtype=torch.float64).long()
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "norm": float(flat.float().norm()),
        "sample": [round(float(v), 7) for v in flat[positions.to(flat.device)].float().cpu()],
    }


def model_identity(model) -> dict:
    config = getattr(model, "config", None)
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "revision": getattr(config, "_commit_hash", None),
        "model_type": getattr(config, "model_type", None),
    }


def model_fingerprint(model, tensors: dict[str, torch.Tensor]) -> dict:
    """The fingerprint of `model` restricted to `tensors` (parameter name -> original value)."""
    return {**model_identity(model), "tensors": {name: tensor_digest(t) for name, t in sorted(tensors.items())}}


def check_fingerprint(fingerprint: dict, model, tensors: dict[str, torch.Tensor], what: str = "edit") -> None:
    """Raise :class:`BaseModelMismatchError` unless `tensors` (the model's originals) match `fingerprint`."""
    saved_type = fingerprint.get("model_type")
    identity = model_identity(model)
    if saved_type and identity["model_type"] and saved_type != identity["model_type"]:
        raise BaseModelMismatchError(
            f"This {what} was made for a {saved_type} model ({fingerprint.get('name_or_path')}), but the base model "
            f"given is a {identity['model_type']} model ({identity['name_or_path']}). Load the base model it was "
            "made for."
        )
    inexact = []
    for name, saved in fingerprint.get("tensors", {}).items():
        if name not in tensors:
            raise BaseModelMismatchError(
                f"This {what} touches {name!r}, which the base model {identity['name_or_path']} does not have; it was "
                f"made for {fingerprint.get('name_or_path')}."
            )
        current = tensor_digest(tensors[name])
        if current["sha256"] == saved["sha256"]:
            continue
        same = current["shape"] == saved["shape"] and _close(current, saved)
        if not same:
            raise BaseModelMismatchError(
                f"The base model's {name!r} differs from the one this {what} was made on "
                f"({fingerprint.get('name_or_path')}, revision {fingerprint.get('revision')}): shape "
                f"{current['shape']} vs {saved['shape']}, norm {current['norm']:.6g} vs {saved['norm']:.6g}. "
                "Load the base model (and revision) the artifact names, or make the edit again on this model."
            )
        inexact.append(name)
    if inexact:
        logger.info(
            "The base model matches the %s's fingerprint up to rounding (another dtype) on %d tensor(s).",
            what,
            len(inexact),
        )


def _close(current: dict, saved: dict) -> bool:
    a, b = torch.tensor(current["sample"]), torch.tensor(saved["sample"])
    norm_ok = abs(current["norm"] - saved["norm"]) <= NORM_RTOL * max(abs(saved["norm"]), 1e-12)
    return norm_ok and a.shape == b.shape and torch.allclose(a, b, rtol=SAMPLE_RTOL, atol=SAMPLE_ATOL)
