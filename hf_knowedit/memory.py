"""Measuring the memory a piece of work takes: the peak of live tensor memory, and the process's resident memory.

On GPU, `torch.cuda.max_memory_allocated()` answers "how much tensor memory did this need at most"; on CPU nothing
keeps that count, and the process's peak resident set size (RSS) is a poor stand-in: it holds the Python and torch
runtime (a few hundred MB), the allocator keeps freed memory, large blocks are mapped and unmapped by `malloc` as it
sees fit, and `getrusage` gives the peak of the whole process lifetime. :func:`track_memory` measures both:

- **tensor peak**: every allocation and free of the CPU allocator while the block runs, read from the PyTorch
  profiler's memory events (`profile_memory=True`) in time order; their running sum is the tensor memory allocated
  in the block and still alive, and its maximum the peak above what was alive when the block started. That is exact
  for tensors (every tensor's storage goes through the allocator), independent of `malloc`'s caching, and includes
  the temporaries inside kernels that a Python-level dispatch hook would miss. What was alive at the start (the model
  weights, above all) is counted separately, from the live tensors found by the garbage collector; their sum is the
  **total tensor peak**, what a planner must fit in memory. The profiler slows the block down (about 1.5x).
- **RSS**: the resident set before the block and its high-water mark during the block (Linux resets the mark by
  writing `5` to `/proc/self/clear_refs`; elsewhere the lifetime peak of `getrusage` is reported, an upper bound).

On CUDA the same object reports `torch.cuda.max_memory_allocated()` besides.
"""

import contextlib
import gc
import os
import resource
import sys
from dataclasses import dataclass, field

import torch


@dataclass
class MemoryMeasurement:
    """What :func:`track_memory` measured, in bytes.

    Args:
        baseline_tensor_bytes (`int`): tensor memory alive when the block started (model weights, ...).
        peak_tensor_bytes (`int`): the most tensor memory allocated inside the block and alive at once.
        rss_start_bytes (`int`): resident memory of the process when the block started.
        rss_peak_bytes (`int`): the high-water mark of resident memory during the block (the lifetime peak where it
            cannot be reset: see `rss_peak_is_lifetime`).
        rss_peak_is_lifetime (`bool`): whether `rss_peak_bytes` is the process's lifetime peak.
        cuda_peak_bytes (`int`, *optional*): `torch.cuda.max_memory_allocated()` during the block, on CUDA.
        num_events (`int`): allocator events seen.
    """

    baseline_tensor_bytes: int = 0
    peak_tensor_bytes: int = 0
    rss_start_bytes: int = 0
    rss_peak_bytes: int = 0
    rss_peak_is_lifetime: bool = False
    cuda_peak_bytes: int | None = None
    num_events: int = 0
    timeline: list[tuple[int, int]] = field(default_factory=list, repr=False)

    @property
    def total_tensor_peak_bytes(self) -> int:
        """Tensor memory alive at the peak: what was alive at the start plus the peak inside the block."""
        return self.baseline_tensor_bytes + self.peak_tensor_bytes

    @property
    def rss_increase_bytes(self) -> int:
        return max(0, self.rss_peak_bytes - self.rss_start_bytes)


def live_tensor_bytes() -> int:
    """Bytes of the CPU tensor storages alive now (found by the garbage collector; shared storages counted once)."""
    import warnings

    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some lazily deprecated torch objects warns
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != "cpu" or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue
        pointer = storage.data_ptr()
        if pointer and pointer not in seen:
            seen.add(pointer)
            total += storage.nbytes()
    return total


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _lifetime_rss_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def track_memory(tensors: bool = True, keep_timeline: bool = False):
    """Measure the tensor memory and resident memory a block of work takes; yields a :class:`MemoryMeasurement`,
    filled in when the block exits.

    Args:
        tensors (`bool`, *optional*, defaults to `True`): record the allocator's events for the tensor peak. The
            profiler's event buffers take resident memory of their own (tens of MB per 100,000 events, and a few
            hundred MB the first time it runs in a process), so measure RSS in a run with `tensors=False`.
        keep_timeline (`bool`, *optional*, defaults to `False`): keep `(time_ns, bytes alive)` after every event.

    Example:

    ```python
    >>> import torch
    >>> from hf_knowedit.memory import track_memory
    >>> with track_memory() as measured:
    ...     a = torch.zeros(1000, 1000)  # 4 MB
    ...     b = torch.zeros(1000, 1000)  # 8 MB alive
    ...     del a, b
    ...     c = torch.zeros(500, 1000)   # 2 MB
    >>> measured.peak_tensor_bytes
    8000000

    ```
    """
    from torch.profiler import ProfilerActivity, profile

    measurement = MemoryMeasurement()
    gc.collect()
    measurement.baseline_tensor_bytes = live_tensor_bytes()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) if tensors \
        else None
    if profiler is not None:
        with _quiet_profiler():
            profiler.__enter__()
    # The profiler's own start-up memory counts in the starting RSS, not in the increase.
    resettable = _reset_rss_peak()
    measurement.rss_start_bytes = _status_bytes("VmRSS") or 0
    measurement.rss_peak_is_lifetime = not resettable
    try:
        yield measurement
    finally:
        if profiler is not None:
            with _quiet_profiler():
                profiler.__exit__(None, None, None)
        measurement.rss_peak_bytes = (_status_bytes("VmHWM") if resettable else None) or _lifetime_rss_peak()
        if cuda:
            measurement.cuda_peak_bytes = int(torch.cuda.max_memory_allocated())
        if profiler is not None:
            _read_events(profiler, measurement, keep_timeline)


def _read_events(profiler, measurement: MemoryMeasurement, keep_timeline: bool) -> None:
    """The running sum of the CPU allocator's events, in time order: its maximum is the tensor peak."""
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    timeline = []
    for time_ns, nbytes in events:
        running += nbytes
        peak = max(peak, running)
        if keep_timeline:
            timeline.append((time_ns, running))
    measurement.peak_tensor_bytes = peak
    measurement.num_events = len(events)
    measurement.timeline = timeline


@contextlib.contextmanager
def _quiet_profiler():
    """Silence the profiler's own start/stop lines and its warning about blocks allocated before it started."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stderr = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                yield
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)


__all__ = ["MemoryMeasurement", "live_tensor_bytes", "track_memory"]
