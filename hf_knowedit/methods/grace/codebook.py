"""GRACE's discrete key-value adaptor: the codebook, its lookup, and the paper's rules for adding keys."""

import contextlib
from typing import ClassVar

import torch
from torch import nn

from ...deltas import EditComponent, first_tensor, register_component, replace_first_tensor
from ..calinet.side_ffn import check_key_width


@register_component
class GraceCodebook(EditComponent):
    """Keys `(n, hidden)`, values `(n, hidden)`, radii `(n,)` and the target each entry was made for.

    The output of the hooked block at each position is replaced by `values[i]` when its nearest key `keys[i]` is within
    `radii[i]` (Euclidean distance, fp32); otherwise it is returned unchanged, bit for bit.
    """

    kind: ClassVar[str] = "grace_codebook"

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor, labels: list[str]):
        super().__init__()
        if keys.dim() != 2 or values.shape != keys.shape or radii.shape != keys.shape[:1] or len(labels) != len(keys):
            raise ValueError(
                "A GRACE codebook needs keys and values (n, hidden), radii (n,) and n labels, got "
                f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(radii.shape)} and {len(labels)} labels."
            )
        self.register_buffer("keys", keys.detach().float().clone())
        self.register_buffer("values", values.detach().float().clone())
        self.register_buffer("radii", radii.detach().float().clone())
        self.labels = [str(label) for label in labels]
        self.enabled = True

    @classmethod
    def empty(cls, hidden: int) -> "GraceCodebook":
        return cls(torch.zeros(0, hidden), torch.zeros(0, hidden), torch.zeros(0), [])

    def __len__(self) -> int:
        return self.keys.shape[0]

    def lookup(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row of `hidden` `(m, d)`: the nearest entry and whether it lies within that entry's radius."""
        distances = torch.cdist(hidden.float(), self.keys)
        nearest_distance, nearest = distances.min(-1)
        return nearest, nearest_distance <= self.radii[nearest]

    def forward(self, module_input, module_output):
        out = first_tensor(module_output)
        if not self.enabled or len(self) == 0:
            return module_output
        flat = out.reshape(-1, out.shape[-1])
        nearest, hit = self.lookup(flat)
        if not hit.any():
            return module_output
        replaced = torch.where(hit[:, None], self.values[nearest].to(out.dtype), flat).reshape(out.shape)
        return replace_first_tensor(module_output, replaced)

    def insert(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: str) -> str:
        """Add one edit by the paper's rules; returns `"add"`, `"expand"` or `"split"`."""
        key, value = key.detach().float().to(self.keys.device), value.detach().float().to(self.keys.device)
        action = "add"
        if len(self):
            distances = (self.keys - key).norm(dim=-1)
            distance, i = distances.min(0)
            distance, i = float(distance), int(i)
            if distance <= radius + float(self.radii[i]):
                if self.labels[i] == label:  # same target: the ball grows to cover the new key
                    self.radii[i] = max(float(self.radii[i]), distance)
                    return "expand"
                self.radii[i] = radius = distance / 2  # conflicting targets: both balls shrink to meet halfway
                action = "split"
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value[None]])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.labels.append(label)
        return action

    def copy(self) -> "GraceCodebook":
        return GraceCodebook(self.keys, self.values, self.radii, list(self.labels))

    def combine(self, other):
        if not isinstance(other, GraceCodebook) or other.keys.shape[1:] != self.keys.shape[1:]:
            return None
        merged = self.copy()
        for i in range(len(other)):
            merged.insert(other.keys[i], other.values[i], float(other.radii[i]), other.labels[i])
        return merged

    def extra_meta(self):
        return {"labels": self.labels}

    def check_compatible(self, edited_model, path: str) -> None:
        check_key_width(self.keys, edited_model, f"The GRACE codebook at {path}")

    @classmethod
    def from_state(cls, tensors, meta):
        if not isinstance(meta.get("labels"), list):
            raise ValueError("the GRACE codebook lacks its 'labels' list")
        return cls(tensors["keys"], tensors["values"], tensors["radii"], meta["labels"])


class TrainableValue(nn.Module):
    """One codebook entry whose value is trained: replaces the output at the given positions by `value`."""

    kind: ClassVar[str] = "grace_value"

    def __init__(self, value: torch.Tensor, positions: list[int]):
        super().__init__()
        self.value = nn.Parameter(value.detach().float().clone())
        self.positions = positions

    @property
    def device(self):
        return self.value.device

    def forward(self, module_input, module_output):
        out = first_tensor(module_output)
        rows = torch.arange(out.shape[0], device=out.device)
        positions = torch.tensor(self.positions, device=out.device)
        mask = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
        mask[rows, positions] = True
        replaced = torch.where(mask[..., None], self.value.to(out.dtype), out)
        return replace_first_tensor(module_output, replaced)


@contextlib.contextmanager
def codebooks_bypassed(edited_model, path: str):
    """Switch off the active GRACE codebooks at `path` (to read raw keys, and to train values on them)."""
    books = [c for name in edited_model.active_edits for c in edited_model.get_edit(name).components.get(path, ())
             if isinstance(c, GraceCodebook)]
    for book in books:
        book.enabled = False
    try:
        yield
    finally:
        for book in books:
            book.enabled = True
