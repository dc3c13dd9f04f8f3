"""deqlib: deep equilibrium models with Jacobian regularization.

Layers (each imports only the ones above it): ``solvers`` -> ``deq`` -> ``jacobian`` -> ``nn``
-> ``models``; beside them ``data``, ``train``, ``measure``, ``report``.
"""

from . import jacobian, nn
from .deq import BACKWARD_MODES, DEQ, DEQStats, SolverSettings, StatePacker
from .solvers import METHODS, STOP_MODES, SolverResult, solve

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
