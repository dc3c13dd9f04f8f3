"""deqlib: deep equilibrium models with Jacobian regularization.

Layers (each imports only the ones above it): ``solvers`` -> ``deq`` -> ``jacobian`` -> ``nn``
-> ``models``; beside them ``data``, ``train``, ``measure``, ``report``.
"""

from . import numerics

if numerics.is_pinned_requested():  # a process started on the pinned path (deqlib.numerics)
    numerics.apply_pinned()

from . import jacobian, nn  # noqa: E402
from .deq import BACKWARD_MODES, DEQ, DEQStats, SolverSettings, StatePacker  # noqa: E402
from .solvers import METHODS, STOP_MODES, SolverResult, solve  # noqa: E402

__all__ = [
    "solve",
    "SolverResult",
    "METHODS",
    "STOP_MODES",
    "DEQ",
    "DEQStats",
    "SolverSettings",
    "StatePacker",
    "BACKWARD_MODES",
    "jacobian",
    "nn",
]
__version__ = "0.1.0"
