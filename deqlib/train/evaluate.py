"""Test-set statistics summed over batches, split across the processes of a run."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..checks import check_int

__all__ = ["evaluate"]


def evaluate(
    fn: Callable[[int, int], Mapping[str, Tensor | float]],
    n_items: int,
    batch_size: int,
    accelerator: Any = None,
) -> dict[str, float]:
    """Sum per-batch statistics over ``range(n_items)``, split across processes.

    The items are cut into the contiguous batches ``[start, stop)`` of ``batch_size`` (the last
    one shorter, never padded); process ``r`` of ``w`` takes batches ``r, r + w, ...``. ``fn(start,
    stop)`` returns sums over its batch (e.g. ``{"correct": 37, "n": 64}``, numbers or 0-d
    tensors); the totals are added up over every process, so each item counts exactly once.

    Args:
        accelerator: an ``accelerate.Accelerator`` (None: this process does every batch).
    Returns:
        The totals, the same on every process.
    """
    check_int("n_items", n_items, 1)
    check_int("batch_size", batch_size, 1)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    totals: dict[str, float] = {}
    for b in range(rank, math.ceil(n_items / batch_size), world):
        start = b * batch_size
        for key, value in fn(start, min(n_items, start + batch_size)).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if world > 1:
        from accelerate.utils import gather_object

        # Objects, not tensors: a process may have had no batch and so no keys.
        merged: dict[str, float] = {}
        for part in gather_object([totals]):
            for key, value in part.items():
                merged[key] = merged.get(key, 0.0) + value
        totals = merged
    return totals
