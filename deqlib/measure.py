"""Measuring cost: live tensor memory on any device, and saved-for-backward bytes.

``PeakMemory`` counts the bytes of the storages of tensors created by torch operations inside
its block and keeps the peak of those still alive; it works on CPU, where torch has no
allocator statistics, and agrees with ``torch.cuda.max_memory_allocated`` up to allocator
rounding. :func:`peak_memory` is the one way a benchmark or an experiment measures the peak of
a call: the allocator's own statistics on CUDA, ``PeakMemory`` elsewhere, with a line saying
which. ``saved_tensor_bytes`` sums the bytes autograd saves for backward (activation
memory), exactly and on any device. :func:`step_memory` takes both of a training step in one
run (and, on CUDA, the allocator's peak too). ``steady_malloc`` keeps glibc from handing freed blocks
back to the OS between calls, which otherwise makes CPU timings of the same call swing ~2x.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory", "MemoryPeak", "peak_memory", "StepMemory", "step_memory", "OpCounter",
           "saved_tensor_bytes", "median_time", "steady_malloc"]


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as pm: ...`` then ``pm.peak`` is the peak of live bytes created inside.

    Storages are keyed by data pointer and reference-counted over the tensor objects that ops
    return, so views and in-place results are not double-counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # data_ptr -> [n tensor objects, nbytes]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                entry = self._refs[key] = [0, storage.nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


class MemoryPeak(NamedTuple):
    """The peak memory of one call: ``nbytes``, and ``counted``, what those bytes count in words
    (reports print it beside the figure, since the two devices count differently)."""

    nbytes: int
    counted: str


def peak_memory(fn: Callable[[], Any], device: torch.device | str, count_existing: bool = False) -> MemoryPeak:
    """The peak memory of ``fn()`` run on ``device``.

    On CUDA: ``torch.cuda.max_memory_allocated`` during the call (the device synchronized on
    both sides), minus what was allocated before it unless ``count_existing`` (then the
    parameters, optimizer state and inputs that already existed are in the figure). Elsewhere:
    :class:`PeakMemory`'s peak of live tensor bytes made inside the call, which cannot see what
    existed before it, whatever ``count_existing`` says.
    """
    device = torch.device(device)
    if device.type != "cuda":
        with PeakMemory() as pm:
            fn()
        return MemoryPeak(pm.peak, "deqlib.measure.PeakMemory: live tensor bytes made inside the call "
                                   "(what existed before it, e.g. parameters and optimizer state, not included)")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = 0 if count_existing else torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    if count_existing:
        return MemoryPeak(peak, "torch.cuda.max_memory_allocated (what existed before the call, e.g. "
                                "parameters and optimizer state, included)")
    return MemoryPeak(peak, "torch.cuda.max_memory_allocated above what was allocated before the call")


class StepMemory(NamedTuple):
    """The memory of one call (a training step), measured three ways in one run.

    ``peak_live_bytes``: :class:`PeakMemory`'s peak of the live tensors made inside the call
    (activations, temporaries, gradients made by its backward, a solver's buffers while a
    solve holds them; not what existed before it, e.g. parameters and optimizer state), the
    same figure on every device. ``saved_bytes``: the distinct storages autograd saved for
    backward inside the call (activations and the weights the backward reads), exact on every
    device. ``cuda_peak_bytes``: ``torch.cuda.max_memory_allocated`` during the call above what
    was allocated before it, on CUDA only (None elsewhere).
    """

    peak_live_bytes: int
    saved_bytes: int
    cuda_peak_bytes: int | None = None


def step_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> StepMemory:
    """Run ``fn()`` once and return its :class:`StepMemory`. The saved-tensor hook only
    records sizes and allocates nothing, so the peaks are those of ``fn`` alone."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakMemory() as pm, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    cuda_peak = None
    if cuda:
        torch.cuda.synchronize(device)
        cuda_peak = torch.cuda.max_memory_allocated(device) - base
    return StepMemory(pm.peak, sum(seen.values()), cuda_peak)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as oc: ...`` then ``oc.count`` is the number of torch operations run
    inside that compute something: views (which launch nothing on a GPU) are not counted.

    On a GPU at DEQ sizes the cost of a solver's own work is the number of kernels it launches,
    so this count, the same on any device, predicts it. ``with oc.paused(): ...`` leaves a
    stretch out (f, when counting a solver's own operations).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._paused = 0

    def paused(self) -> _Pause:
        return _Pause(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused and not func.is_view and func.overloadpacket.__name__ not in _NO_WORK:
            self.count += 1
        return func(*args, **(kwargs or {}))


# Operations that only reinterpret a tensor's metadata without being marked as views.
_NO_WORK = frozenset({"detach", "alias", "lift_fresh"})


class _Pause:
    def __init__(self, counter: OpCounter) -> None:
        self.counter = counter

    def __enter__(self) -> None:
        self.counter._paused += 1

    def __exit__(self, *exc: object) -> None:
        self.counter._paused -= 1


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, bytes of distinct storages saved for backward)``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA synchronized when available)."""

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def steady_malloc(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**30) -> bool:
    """Make CPU timings repeatable: glibc keeps freed heap memory instead of returning it.

    By default glibc serves blocks over a (dynamic) threshold with ``mmap`` and trims the heap
    top on ``free``, so an 8 MB activation freed after one call is page-faulted in again by the
    next: one ConvMap call then takes 24 to 50 ms depending on the heap's history. This sets
    the same limits as the environment variables ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=1073741824`` would, but from inside a running process (it applies
    to allocations made from now on). Returns True when applied, False where the C library is
    not glibc (then timings are what they are).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
