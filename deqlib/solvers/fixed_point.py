"""Plain (or damped) fixed-point iteration."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..buffers import Empty
from ..checks import check_real
from .result import ResidualTracker
from .products import FlatMap

__all__ = ["FixedPointOptions", "fixed_point"]


@dataclass(frozen=True)
class FixedPointOptions:
    """``z <- z + beta (f(z) - z)``; beta=1 is plain iteration."""

    beta: float = 1.0

    def __post_init__(self) -> None:
        check_real("beta", self.beta, minimum=0, maximum=1, min_open=True)


def fixed_point(f: FlatMap, z: Tensor, tracker: ResidualTracker, opts: FixedPointOptions, empty: Empty) -> None:
    while True:
        fz = f(z)
        g = fz - z
        if tracker.record(z, fz, g):
            return
        # f's output may be a best iterate the tracker keeps: it is held by a copy, not in place
        z = tracker.hold(fz) if opts.beta == 1.0 else tracker.hold(z.add(g, alpha=opts.beta), owned=True)
