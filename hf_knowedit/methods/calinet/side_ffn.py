"""Neurons beside a feed-forward block, shared by CaliNET (calibration memory slots) and T-Patcher (patches).

Both methods add `n` trainable neurons next to a transformer's FFN: with `x` the FFN's input,

    output += act(x @ keysᵀ + biases) @ values

where `keys` is `(n, hidden)`, `biases` `(n,)` and `values` `(n, hidden)`. With `act = relu`, a neuron that does not
fire adds exactly zero, so prompts on which no neuron fires keep their outputs bit for bit.
"""

import contextlib
from typing import ClassVar

import torch
from torch import nn

from ...deltas import EditComponent, first_tensor, register_component, replace_first_tensor
from ...errors import ArtifactError


ACTIVATIONS = ("relu", "gelu")


def ffn_host_path(layout, layer: int) -> str:
    """The module whose input is the FFN input and whose output is the FFN output in block `layer`.

    That is the parent of the MLP output projection (`model.layers.3.mlp`, `decoder.block.3.layer.2.DenseReluDense`);
    in blocks without an MLP submodule (OPT's `fc1`/`fc2` sit in the block), the block itself.
    """
    parent = layout.mlp_out_name.rpartition(".")[0]
    block = layout.block_path(layer)
    return f"{block}.{parent}" if parent else block


def check_key_width(keys: torch.Tensor, edited_model, what: str) -> None:
    """Raise :class:`ArtifactError` unless the `(n, d)` `keys` of a saved side module match the model's hidden size."""
    expected = hidden_size(edited_model.base_model)
    if keys.shape[1] != expected:
        raise ArtifactError(
            f"{what} has {keys.shape[1]}-dimensional keys, but the model's hidden size is {expected}: the edit was "
            "made for another model."
        )


def hidden_size(model) -> int:
    config = model.config
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "hidden_size", None) or config.d_model)


def key_positions(batch) -> list[int]:
    """Where an edit's key is read in each row of a prompt-target batch: the prompt's last token for decoder-only
    models, the first decoder position (which cross-attends to the whole prompt) for encoder-decoders."""
    return [0 if batch.is_encoder_decoder else n - 1 for n in batch.prompt_lengths]


@contextlib.contextmanager
def record_module_io(model: nn.Module, path: str):
    """Record the first tensor of the input and output of `model.<path>` on each forward pass run inside the block."""
    records: dict[str, list[torch.Tensor]] = {"input": [], "output": []}

    def hook(module, args, kwargs, output):
        value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        records["input"].append(first_tensor(value).detach())
        records["output"].append(first_tensor(output).detach())

    handle = model.get_submodule(path).register_forward_hook(hook, with_kwargs=True)
    try:
        yield records
    finally:
        handle.remove()


@register_component
class SideFFN(EditComponent):
    """`n` neurons beside a feed-forward block: `output += act(x @ keysᵀ + biases) @ values`, computed in fp32.

    Args:
        keys (`torch.Tensor`): `(n, hidden)`.
        biases (`torch.Tensor`): `(n,)`.
        values (`torch.Tensor`): `(n, hidden)`.
        activation (`str`, *optional*, defaults to `"relu"`): `"relu"` or `"gelu"`.
        trainable (`bool`, *optional*, defaults to `False`): hold the tensors as parameters (while an editor trains).
    """

    kind: ClassVar[str] = "side_ffn"

    def __init__(self, keys, biases, values, activation: str = "relu", trainable: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"SideFFN activation must be one of {ACTIVATIONS}, got {activation!r}.")
        if keys.dim() != 2 or values.shape != keys.shape or biases.shape != keys.shape[:1]:
            raise ValueError(
                f"SideFFN needs keys and values (n, hidden) and biases (n,), got {tuple(keys.shape)}, "
                f"{tuple(values.shape)} and {tuple(biases.shape)}."
            )
        self.activation = activation
        for name, tensor in (("keys", keys), ("biases", biases), ("values", values)):
            tensor = tensor.detach().to(torch.float32).clone()
            if trainable:
                setattr(self, name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    @property
    def num_neurons(self) -> int:
        return self.keys.shape[0]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The neurons' pre-activations `x @ keysᵀ + biases`, `(..., n)`, in fp32."""
        return x.float() @ self.keys.T + self.biases

    def forward(self, module_input, module_output):
        out = first_tensor(module_output)
        scores = self.scores(first_tensor(module_input))
        if self.activation == "relu":
            if not (scores > 0).any():
                return module_output  # no neuron fires: the output stays exactly as it was
            hidden = torch.relu(scores)
        else:
            hidden = nn.functional.gelu(scores)
        return replace_first_tensor(module_output, out + (hidden @ self.values).to(out.dtype))

    def frozen(self) -> "SideFFN":
        return SideFFN(self.keys, self.biases, self.values, self.activation)

    def extra_meta(self):
        return {"activation": self.activation}

    def combine(self, other):
        same_kind = isinstance(other, SideFFN) and other.activation == self.activation
        if same_kind and other.keys.shape[1:] == self.keys.shape[1:]:
            return SideFFN(torch.cat([self.keys, other.keys]), torch.cat([self.biases, other.biases]),
                           torch.cat([self.values, other.values]), self.activation)
        return None

    def check_compatible(self, edited_model, path: str) -> None:
        check_key_width(self.keys, edited_model, f"The side FFN at {path}")

    @classmethod
    def from_state(cls, tensors, meta):
        return cls(tensors["keys"], tensors["biases"], tensors["values"], meta.get("activation", "relu"))
