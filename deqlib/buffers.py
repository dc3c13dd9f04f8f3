"""Reusable CPU buffers for the solvers' histories.

Why: a solver's history at MDEQ size (batch 32, 64 x 32 x 32) is 40 to 190 MB. glibc serves
every block over 32 MB (its largest mmap threshold) with a fresh ``mmap``, so each solve
page-faulted its whole history in again: about 41,000 faults per Broyden solve on the map of
``python -m deqlib.bench solvers``, 7% of its solve time there (0.715 s -> 0.667 s, medians of
16 solves each; Anderson's smaller history showed no difference beyond noise). A training loop
solves at the same sizes step after step, so the pool keeps the buffers a solve gives back and
lends them to the next one. On CUDA the caching allocator already reuses blocks, and buffers
there are not kept.

Accounting: a lent buffer is handed out as a view made by a torch operation, so
:class:`deqlib.measure.PeakMemory` counts its storage as live while, and only while, a solve
holds it. Memory kept in the pool between solves is bounded by ``max_free_bytes`` and given
back by :func:`release_buffers`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["BufferPool", "release_buffers", "POOL"]

Empty = Callable[..., Tensor]  # empty(*shape, like=tensor) -> uninitialized tensor


class BufferPool:
    """Flat CPU buffers kept between solves; thread-safe, and nested solves get their own.

    Args:
        max_free_bytes: the most bytes kept while no solve holds them; the buffers returned
            longest ago are freed first.
        min_bytes: smaller requests go straight to the allocator (glibc reuses those itself).
    """

    def __init__(self, max_free_bytes: int = 512 << 20, min_bytes: int = 1 << 20):
        self.max_free_bytes = max_free_bytes
        self.min_bytes = min_bytes
        self._free: list[Tensor] = []  # 1-D buffers, the most recently returned last
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for b in self._free)

    def clear(self) -> None:
        """Free every kept buffer."""
        with self._lock:
            self._free.clear()

    def _take(self, numel: int, dtype: torch.dtype) -> Tensor | None:
        """A kept buffer of ``dtype`` with exactly ``numel`` elements, removed (the one given
        back last). Exactly: a larger one would make a solve hold, and PeakMemory count, the
        size of whatever ran before it (a training loop repeats its sizes anyway)."""
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):
                b = self._free[i]
                if b.dtype == dtype and b.numel() == numel:
                    return self._free.pop(i)
            return None

    def _give(self, buffers: list[Tensor]) -> None:
        with self._lock:
            self._free.extend(buffers)
            total = sum(b.numel() * b.element_size() for b in self._free)
            while self._free and total > self.max_free_bytes:
                old = self._free.pop(0)
                total -= old.numel() * old.element_size()

    @contextmanager
    def lease(self) -> Iterator[Empty]:
        """``with pool.lease() as empty: h = empty(B, m, D, like=z)``; every buffer lent inside
        goes back to the pool on exit, so nothing made from one may outlive the block."""
        lent: list[Tensor] = []

        def empty(*shape: int, like: Tensor) -> Tensor:
            numel = math.prod(shape)
            if like.device.type != "cpu" or numel * like.element_size() < self.min_bytes:
                return like.new_empty(shape)
            base = self._take(numel, like.dtype)
            if base is None:
                base = like.new_empty(numel)
            lent.append(base)
            # A view, not ``base`` itself: an operation's output is what PeakMemory counts.
            return base.view(shape)

        try:
            yield empty
        finally:
            self._give(lent)


POOL = BufferPool()


def release_buffers() -> None:
    """Free the history buffers the solvers keep between solves (CPU only)."""
    POOL.clear()
