"""The few collective operations the library needs when it runs under `accelerate launch` (or `torchrun`).

Statistics, evaluation and editor training shard their work over the processes of an initialised `torch.distributed`
group and combine the results with these; in a single process they are no-ops.
"""

import torch


def rank_and_world_size() -> tuple[int, int]:
    """`(rank, world_size)` of torch.distributed when initialised with more than one process, else `(0, 1)`.

    >>> rank_and_world_size()
    (0, 1)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or minimum, `op="min"`) `tensor` over the processes, in place; returns it."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return tensor


def collective_device() -> torch.device:
    """Where tensors must be for a collective: this process's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
