"""Where a module computes, and its weights, on models dispatched by accelerate.

A model loaded with `device_map="auto"` (or passed through `accelerate.dispatch_model` / `cpu_offload`) has its layers
spread over devices, and the layers that did not fit are *offloaded*: their parameters are on the `meta` device and an
accelerate hook (`module._hf_hook`) loads them from CPU memory or disk for each forward pass. Everything the library
computes for a module (keys, values, statistics, deltas) goes to that module's execution device, found here, and
everything that reads a weight's values reads it through [`materialized_weight`].
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def _first_tensor_device(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return tensor.device
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's execution device when it has one, else the device of its
    parameters (CPU for offloaded parameters without a hook, or for a module without tensors).

    >>> execution_device(torch.nn.Linear(2, 3))
    device(type='cpu')
    """
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    device = _first_tensor_device(module)
    if device is None or device.type == "meta":
        return torch.device("cpu")
    return device


def input_device(model: nn.Module) -> torch.device:
    """The device a model's input ids go to: the execution device of its input embeddings.

    >>> input_device(torch.nn.Sequential(torch.nn.Embedding(5, 2)))
    device(type='cpu')
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return execution_device(embeddings if embeddings is not None else model)


def is_offloaded(module: nn.Module) -> bool:
    """Whether any of `module`'s own parameters is offloaded by accelerate (held on the `meta` device and loaded for
    each forward pass).

    >>> is_offloaded(torch.nn.Linear(2, 3))
    False
    """
    return any(p.device.type == "meta" for p in module.parameters(recurse=False))


@contextmanager
def onloaded(module: nn.Module):
    """Inside the block, an offloaded `module`'s parameters hold their values (accelerate's `align_module_device`);
    a module that is not offloaded is left as it is."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, execution_device=execution_device(module)):
        yield module


def named_state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of `model`, then every buffer, by name and in the order of `named_parameters()` and
    `named_buffers()` (shared tensors once), each holding its values: an offloaded module's tensors are read inside
    :func:`onloaded`, so use each one before asking for the next.

    >>> [name for name, _ in named_state_tensors(torch.nn.Linear(2, 3))]
    ['weight', 'bias']
    """
    for members in ("_parameters", "_buffers"):
        seen: set[int] = set()
        for prefix, module in model.named_modules():
            names = []
            for name, tensor in getattr(module, members).items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    names.append(name)
            if not names:
                continue
            with onloaded(module):
                for name in names:
                    tensor = getattr(module, name)
                    full_name = f"{prefix}.{name}" if prefix else name
                    if tensor.device.type == "meta":
                        raise RuntimeError(f"{full_name!r} is on the meta device and no accelerate hook holds its "
                                           "values; load the model's weights first.")
                    yield full_name, tensor


def materialized_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The values of `module.<name>`: the parameter itself when it is in memory, a detached copy loaded from
    accelerate's offload store when it is offloaded.

    >>> linear = torch.nn.Linear(2, 3)
    >>> materialized_weight(linear) is linear.weight
    True
    """
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    with onloaded(module):
        tensor = getattr(module, name)
        if tensor.device.type == "meta":
            raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook holds "
                               "its values; load the model's weights first.")
        return tensor.detach().clone()
