"""Fixed-point solvers behind one call: ``solve(f, z0, method=...)``.

Every method works on a batch: ``z0`` has shape ``(B, ...)`` and ``f`` maps a tensor of that
shape to one of the same shape, sample ``b`` of the output depending only on sample ``b`` of
the input. Internally states are flattened to ``(B, D)``.

What every method shares (and so lives in :class:`ResidualTracker`, not in the methods):
- NFE counts calls of ``f``, the same way for every method;
- after each call the absolute residual ``||f(z) - z||`` and the relative residual
  ``||f(z) - z|| / ||f(z)||`` (the paper's A.5) are recorded per sample;
- the iterate with the lowest residual is kept per sample and returned, with ``f`` at it;
- each sample stops on its own: below ``tol``, or diverged (a non-finite value, or a residual
  grown ``diverge_factor``-fold), it is held at its best iterate while the solve goes on for
  the others, so a sample's result and its NFE (``nfe_per_sample``) do not depend on its
  batch-mates; the solve ends when every sample has stopped or after ``max_iter`` calls.

Memory: fixed-point keeps O(1) states, Anderson ``m`` pairs, Broyden ``window + 3`` states;
none grows with ``max_iter``. On the CPU the history buffers are lent by
:data:`deqlib.buffers.POOL` and kept for the next solve (glibc maps every block over 32 MB
afresh, and a fresh history is page-faulted in again); :func:`deqlib.buffers.release_buffers`
frees them.

Speed (CPU): besides ``f``, a solve's time is memory traffic over the history, so Anderson
and Broyden make two passes over it per iteration (the dots with the new residual, then the
combination giving the next iterate) and write as few fresh rows as they can. On the 2-core
machine here the history is read from DRAM each iteration even when it would fit the cache:
after any pause of a few milliseconds (one call of ``f``) a pass over a 10 MB history took
~0.5 ms instead of ~0.12 ms back to back, with one thread or two.

Speed (GPU): at DEQ sizes an iteration is bound by kernel launches, so the bookkeeping is
written in few operations (``python -m deqlib.bench solvers`` prints them per iteration:
about 13 for plain iteration, 30 for Anderson, 45 for Broyden, ``f`` not counted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from ..buffers import POOL
from ..checks import check_choice, check_int, check_mapping, check_real
from .anderson import AndersonOptions, anderson
from .broyden import BroydenOptions, broyden
from .fixed_point import FixedPointOptions, fixed_point
from .result import STOP_MODES, ResidualTracker, SolverResult

__all__ = ["SolverResult", "ResidualTracker", "solve", "METHODS", "STOP_MODES", "check_method_options",
           "check_solver_args", "FixedPointOptions", "AndersonOptions", "BroydenOptions"]


METHODS: dict[str, tuple[Callable, type]] = {
    "fixed_point": (fixed_point, FixedPointOptions),
    "anderson": (anderson, AndersonOptions),
    "broyden": (broyden, BroydenOptions),
}


def check_method_options(method: str, options: dict) -> object:
    """Validate ``method`` and its options; return the method's options object.

    Raises ValueError naming an unknown method, an unknown option or a bad value.
    """
    check_choice("method", method, METHODS)
    check_mapping("options", options)
    opts_cls = METHODS[method][1]
    known = {fld.name for fld in dataclasses.fields(opts_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method={method!r}; it takes {sorted(known)}"
        )
    return opts_cls(**options)


def check_solver_args(max_iter: int, tol: float, stop_mode: str, diverge_factor: float) -> None:
    """Raise ValueError naming the first bad common solver argument.

    ``diverge_factor`` alone may be infinite: ``inf`` switches the divergence check off.
    """
    check_int("max_iter", max_iter, 1)
    check_real("tol", tol, minimum=0, min_open=True)
    check_choice("stop_mode", stop_mode, STOP_MODES)
    check_real("diverge_factor", diverge_factor, minimum=1, min_open=True, finite=False)


@torch.no_grad()
def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    method: str = "anderson",
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    diverge_factor: float = 1e6,
    check_every: int = 1,
    **method_options,
) -> SolverResult:
    """Find ``z`` with ``f(z) = z`` for each sample of a batch.

    Args:
        f: map from a ``(B, ...)`` tensor to one of the same shape, per sample independent.
        z0: ``(B, ...)`` start point.
        method: ``"anderson"``, ``"broyden"`` or ``"fixed_point"``.
        max_iter: the most calls of ``f``.
        tol: a sample stops when its residual (of kind ``stop_mode``) is below it.
        stop_mode: ``"rel"`` (``||f(z)-z|| / ||f(z)||``) or ``"abs"`` (``||f(z)-z||``).
        diverge_factor: a sample stops as diverged when its absolute residual exceeds this
            multiple of its first one.
        check_every: ask the device whether every sample has stopped only every this many
            calls (1: after each call). The iterates and per-sample NFE do not change; the
            batch may run up to ``check_every - 1`` calls more, with one host transfer per
            ``check_every`` calls instead of one per call (a GPU's synchronization; see
            :class:`ResidualTracker`).
        **method_options: the method's own options (``m``, ``beta``, ``lam`` for Anderson;
            ``window`` for Broyden; ``beta`` for fixed-point). Unknown ones are rejected.

    Returns:
        A :class:`SolverResult`. Runs without autograd; never raises from inside the iteration
        (a sample with non-finite values stops, diverged, and the status says so), but for an ``f`` whose first
        output is not a tensor of ``z0``'s shape (ValueError): flattened, an output of another
        shape with as many numbers would be taken sample by sample in the wrong order.
    """
    check_solver_args(max_iter, tol, stop_mode, diverge_factor)
    check_int("check_every", check_every, 1)
    opts = check_method_options(method, method_options)
    if not callable(f):
        raise ValueError(f"f must be callable, got f={f!r}")
    if not isinstance(z0, Tensor):
        raise ValueError(f"z0 must be a tensor of shape (B, ...), got z0={z0!r}")
    if z0.dim() < 1 or z0.shape[0] < 1:
        raise ValueError(f"z0 must be a tensor of shape (B, ...), got z0 of shape {tuple(z0.shape)}")
    if not (z0.is_floating_point() or z0.is_complex()):
        # An integer start would be rounded by every update, and a bool one fails deep inside
        # the method with a message that names neither z0 nor its dtype.
        raise ValueError(f"z0 must be a floating-point tensor, got z0 of dtype {z0.dtype}")
    shape = z0.shape
    B = shape[0]
    checked = False

    def f_flat(z: Tensor) -> Tensor:
        nonlocal checked
        out = f(z.view(shape))
        if not checked:  # the first call only: one flag test per iteration after it
            if not isinstance(out, Tensor) or out.shape != shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else f"a {type(out).__name__}"
                raise ValueError(f"f must return a tensor of z0's shape {tuple(shape)}, got {got}")
            checked = True
        return out.reshape(B, -1)

    tracker = ResidualTracker(int(max_iter), float(tol), stop_mode, float(diverge_factor), int(check_every))
    with POOL.lease() as empty:
        METHODS[method][0](f_flat, z0.reshape(B, -1), tracker, opts, empty)
    return tracker.result(shape)
