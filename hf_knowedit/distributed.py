"""The few collective operations the library needs when it runs under `accelerate launch` (or `torchrun`).

Statistics, evaluation and editor training shard their work over the processes of an initialised `torch.distributed`
group and combine the results with these; in a single process they are no-ops.
"""

import atexit
import gc

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


def join_process_group() -> None:
    """Under a launcher (`accelerate launch`, `torchrun`, `mpirun`), join its process group through accelerate's
    `PartialState`: NCCL on this process's GPU, or gloo where there is no GPU (or `accelerate launch --cpu`).

    Outside a launcher, or when the group is already initialised, nothing happens.
    """
    import torch.distributed as dist
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1) > 1
    if launched and dist.is_available() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
        destroy_process_group_at_exit()


_EXIT_HOOK_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Have the default process group destroyed when the interpreter exits, while it is still whole (registered once).

    PyTorch asks for `destroy_process_group()` before exit: a group left to the interpreter's own finalisation can
    abort a process that had finished (`terminate called without an active exception`), and the launcher then reports
    the run as failed. A group already destroyed is left alone.
    """
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(_destroy_process_group)
        _EXIT_HOOK_REGISTERED = True


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # what still holds the group (a reference cycle) goes now, not in the interpreter's finalisation
