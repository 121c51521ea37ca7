"""Edit components: what an edit adds to one module of the model.

A component sees the module's input and output and returns the new output. Weight deltas (dense, low-rank, sparse)
are components whose contribution is `x @ ΔWᵀ`, computed in fp32 whatever the model's dtype, so the base weights are
never touched until a merge is asked for. Side modules (issue: side-memory editors) subclass `EditComponent` too.

All weight deltas use the orientation of `nn.Linear`: `ΔW` is `(out_features, in_features)`. Merging into GPT-2's
`Conv1D`, whose weight is stored `(in, out)`, transposes at that point only.
"""

from typing import ClassVar

import torch
from torch import nn

from .errors import ArtifactError, EditFailedError


COMPONENT_TYPES: dict[str, type["EditComponent"]] = {}


def register_component(cls: type["EditComponent"]) -> type["EditComponent"]:
    """Class decorator: make a component type loadable from artifacts by its `kind`."""
    COMPONENT_TYPES[cls.kind] = cls
    return cls


def first_tensor(value):
    """The first tensor of a module's input or output (modules return tensors or tuples starting with one)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"Expected a tensor or a tuple starting with one, got {type(value).__name__}.")


def replace_first_tensor(value, tensor: torch.Tensor):
    """`value` with its first tensor replaced (keeps the tuple structure of module outputs)."""
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:])) if isinstance(value, tuple) else [tensor, *value[1:]]


def as_token_grid(tensor: torch.Tensor, batch_shape) -> torch.Tensor:
    """`tensor` seen as `(batch, seq, d)`; OPT's MLP works on the tokens flattened to `(batch * seq, d)`, which is
    viewed back (a view: writing into the result writes into `tensor`). Every hook that indexes an activation by
    position goes through this."""
    batch_shape = tuple(batch_shape)
    if tensor.dim() == 2 and len(batch_shape) == 2 and tensor.shape[0] == batch_shape[0] * batch_shape[1]:
        return tensor.view(*batch_shape, tensor.shape[-1])
    if tuple(tensor.shape[:-1]) != batch_shape:
        raise ValueError(f"A hooked activation of shape {tuple(tensor.shape)} does not match the batch {batch_shape}.")
    return tensor


class EditComponent(nn.Module):
    """Base class of what an edit adds at one module.

    Subclasses set `kind`, implement :meth:`contribute` (or override :meth:`forward`), and can be rebuilt from their
    `state_dict` and :meth:`extra_meta` by :meth:`from_state`.
    """

    kind: ClassVar[str] = "component"

    def forward(self, module_input, module_output):
        x = first_tensor(module_input)
        out = first_tensor(module_output)
        update = self.contribute(x.to(self.compute_dtype))
        if update.dtype != out.dtype:  # add in the delta's precision, round once to the model's dtype
            return replace_first_tensor(module_output, (out.to(update.dtype) + update).to(out.dtype))
        return replace_first_tensor(module_output, out + update)

    def contribute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        tensor = next(iter(self.state_dict().values()), None)
        return tensor.dtype if tensor is not None else torch.float32

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.state_dict().values()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def extra_meta(self) -> dict:
        """JSON-serialisable facts needed to rebuild the component besides its tensors."""
        return {}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "EditComponent":
        raise NotImplementedError

    def combine(self, other: "EditComponent") -> "EditComponent | None":
        """A single component equivalent to applying `self` then `other`, or `None` if they cannot be combined."""
        return None

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def check_finite(self, where: str) -> None:
        for name, tensor in self.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise EditFailedError(
                    f"The {self.kind} update for {where} has NaN or Inf values in '{name}'; nothing was changed. "
                    "Lower the learning rate or the number of steps, or edit in fp32."
                )


class WeightDelta(EditComponent):
    """A component that is a change `ΔW` of a linear module's weight, `(out_features, in_features)`."""

    kind: ClassVar[str] = "weight_delta"

    def delta_weight(self) -> torch.Tensor:
        """The dense `ΔW`, `(out, in)`, in fp32."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def combine(self, other):
        if isinstance(other, WeightDelta) and other.shape == self.shape:
            return DenseDelta(self.delta_weight() + other.delta_weight())
        return None


@register_component
class DenseDelta(WeightDelta):
    """A full-matrix weight change `ΔW` (fine-tuning)."""

    kind: ClassVar[str] = "dense"

    def __init__(self, delta: torch.Tensor, trainable: bool = False):
        super().__init__()
        delta = delta.detach().to(torch.float32).clone()
        if trainable:
            self.delta = nn.Parameter(delta)
        else:
            self.register_buffer("delta", delta)

    @property
    def shape(self):
        return tuple(self.delta.shape)

    def contribute(self, x):
        return x @ self.delta.T

    def delta_weight(self):
        return self.delta.detach().float()

    def frozen(self) -> "DenseDelta":
        return DenseDelta(self.delta)

    @classmethod
    def from_state(cls, tensors, meta):
        return cls(tensors["delta"])


@register_component
class LowRankDelta(WeightDelta):
    """A weight change stored as factors, `ΔW = B @ A` with `B` `(out, r)` and `A` `(r, in)`.

    ROME's rank-1 update is `B = u`-side value residual and `A` the key direction; MEMIT's is rank at most the batch
    size per layer. Applying it costs `r * (in + out)` per token instead of `in * out`.
    """

    kind: ClassVar[str] = "low_rank"

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"LowRankDelta needs up (out, r) and down (r, in), got {tuple(up.shape)} and {tuple(down.shape)}."
            )
        self.register_buffer("up", up.detach().to(torch.float32).clone())
        self.register_buffer("down", down.detach().to(torch.float32).clone())

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def shape(self):
        return (self.up.shape[0], self.down.shape[1])

    def contribute(self, x):
        return (x @ self.down.T) @ self.up.T

    def delta_weight(self):
        return self.up @ self.down

    def combine(self, other):
        if isinstance(other, LowRankDelta) and other.shape == self.shape:
            return LowRankDelta(torch.cat([self.up, other.up], dim=1), torch.cat([self.down, other.down], dim=0))
        return super().combine(other)

    @classmethod
    def from_state(cls, tensors, meta):
        return cls(tensors["up"], tensors["down"])


@register_component
class SparseDelta(WeightDelta):
    """A weight change confined to a few rows (`dim=0`, output units) or columns (`dim=1`, input units) of `ΔW`.

    Knowledge neurons are the columns of the MLP output projection (its input units): `dim=1`. Only the touched
    slices are stored: `values` is `(k, in)` for rows, `(out, k)` for columns.
    """

    kind: ClassVar[str] = "sparse"

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dim: int = 1):
        super().__init__()
        if dim not in (0, 1):
            raise ValueError(f"SparseDelta.dim must be 0 (rows) or 1 (columns), got {dim}.")
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        expected = (len(indices), shape[1]) if dim == 0 else (shape[0], len(indices))
        if tuple(values.shape) != expected:
            raise ValueError(f"SparseDelta values must be {expected} for dim={dim}, got {tuple(values.shape)}.")
        if len(indices) and (indices.min() < 0 or indices.max() >= shape[dim]):
            raise ValueError(f"SparseDelta indices must lie in [0, {shape[dim]}).")
        self.register_buffer("indices", indices.clone())
        self.register_buffer("values", values.detach().to(torch.float32).clone())
        self._shape = (int(shape[0]), int(shape[1]))
        self.dim = dim

    @property
    def shape(self):
        return self._shape

    @property
    def compute_dtype(self):
        return self.values.dtype

    def contribute(self, x):
        if self.dim == 1:
            return x.index_select(-1, self.indices) @ self.values.T
        out = x.new_zeros(*x.shape[:-1], self._shape[0])
        return out.index_add(-1, self.indices, x @ self.values.T)

    def delta_weight(self):
        delta = torch.zeros(self._shape, dtype=torch.float32, device=self.values.device)
        return delta.index_add(self.dim, self.indices, self.values)

    def extra_meta(self):
        return {"shape": list(self._shape), "dim": self.dim}

    def combine(self, other):
        if isinstance(other, SparseDelta) and other.shape == self.shape and other.dim == self.dim:
            merged = torch.cat([self.indices, other.indices]).unique()
            dense = self.delta_weight() + other.delta_weight()
            return SparseDelta(merged, dense.index_select(self.dim, merged), self.shape, self.dim)
        return super().combine(other)

    @classmethod
    def from_state(cls, tensors, meta):
        if "shape" not in meta or "dim" not in meta:
            raise ArtifactError("A sparse delta in the artifact lacks its 'shape' or 'dim' metadata.")
        return cls(tensors["indices"], tensors["values"], tuple(meta["shape"]), int(meta["dim"]))


def component_from_state(kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> EditComponent:
    """Rebuild a registered component from its saved tensors and metadata."""
    if kind not in COMPONENT_TYPES:
        raise ArtifactError(
            f"The artifact holds a component of kind {kind!r}, which this version of hf-knowedit does not know "
            f"(known: {sorted(COMPONENT_TYPES)}). Upgrade hf-knowedit or import the package that registers it."
        )
    return COMPONENT_TYPES[kind].from_state(tensors, meta)


def merge_weight_delta(module: nn.Module, delta: torch.Tensor, transposed: bool, sign: float = 1.0) -> None:
    """Add `sign * ΔW` (`(out, in)`, fp32) into `module.weight` in place, in the weight's own dtype."""
    weight = module.weight
    update = delta.T if transposed else delta
    with torch.no_grad():
        weight.copy_((weight.float() + sign * update.to(weight.device)).to(weight.dtype))
