"""The libraries compared, behind one signature: ``solver(f, z0, method, max_iter, tol) -> answer``.

torchdeq is optional (the ``bench`` extra); without it only deqlib's rows are made.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from torch import Tensor

from ...solvers import METHODS as DEQLIB_METHODS
from ...solvers import solve
from .config import LIBRARIES, METHODS

__all__ = ["Solver", "torchdeq_version", "resolve_libraries", "library_solver"]

# deqlib's method names -> torchdeq 0.1.0's registry keys (torchdeq.solver.get_solver).
_TORCHDEQ_KEYS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}

# solver(f, z0 (B, D), method, max_iter, tol) -> answer (B, D): one library's solve, no autograd.
Solver = Callable[[Callable[[Tensor], Tensor], Tensor, str, int, float], Tensor]


def torchdeq_version() -> str | None:
    """torchdeq's installed version, or None when it cannot be imported."""
    try:
        importlib.import_module("torchdeq.solver")
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchdeq")
    except PackageNotFoundError:
        return "unknown"


def resolve_libraries(requested: Sequence[str]) -> tuple[list[str], str]:
    """The requested libraries that can run here, and a line saying what is compared."""
    bad = [lib for lib in requested if lib not in LIBRARIES]
    if bad:
        raise ValueError(f"unknown libraries {bad}; choose from {list(LIBRARIES)}")
    libs = list(requested)
    if "torchdeq" in libs:
        ver = torchdeq_version()
        if ver is None:
            libs.remove("torchdeq")
            return libs, ("torchdeq is not installed (pip install 'deqlib[bench]'): "
                          "deqlib's rows only, no comparison")
        return libs, f"comparing deqlib with torchdeq {ver}"
    return libs, "deqlib only (torchdeq not requested)"


def _deqlib_solver(f: Callable[[Tensor], Tensor], z0: Tensor, method: str, max_iter: int,
                   tol: float) -> Tensor:
    # Default options: Anderson m=5, beta=1, lam=1e-4 relative to the Gram diagonal, stalled samples
    # restarted;
    # Broyden window=100, its memory growing with the calls a solve takes.
    return solve(f, z0, method=method, max_iter=max_iter, tol=tol, stop_mode="rel").z


def _torchdeq_solver(f: Callable[[Tensor], Tensor], z0: Tensor, method: str, max_iter: int,
                     tol: float) -> Tensor:
    # Only max_iter, tol and stop_mode="rel" are set; the rest are torchdeq 0.1.0's defaults:
    # Anderson m=6, lam=1e-4 (absolute), tau=1; Broyden LBFGS_thres=None (a history of
    # max_iter terms, preallocated), ls=False; fixed_point_iter tau=1. All return the lowest-
    # residual estimate (return_final=False).
    from torchdeq.solver import get_solver

    z, _, _ = get_solver(_TORCHDEQ_KEYS[method])(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel")
    return z


def library_solver(library: str, method: str) -> Solver:
    """``solver(f, z0, method, max_iter, tol) -> answer`` for one library (no autograd)."""
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; choose from {list(LIBRARIES)}")
    if method not in METHODS or method not in DEQLIB_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if library == "torchdeq" and torchdeq_version() is None:
        raise ValueError("library 'torchdeq' is not installed (pip install 'deqlib[bench]')")
    return _deqlib_solver if library == "deqlib" else _torchdeq_solver
