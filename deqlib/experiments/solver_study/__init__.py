"""The solver comparison of notebook 07: deqlib's fixed-point, Anderson and Broyden against
torchdeq's.

Two questions a user choosing a DEQ library asks: which solver on which problem, and what the
machinery costs beyond evaluating ``f``. Per problem, library and method, the forward solve and
the implicit backward solve ``u = u J_f(z*) + dL/dz*`` are measured (NFE, convergence and final
residual, time to tolerance, overhead ratio, extra memory, the parameter gradient's error
against a float64 reference).

One job per module:

- :mod:`.config`: the experiment (params.yaml's ``solvers`` section) and the problems' sizes;
- :mod:`.problems`: the seeded problems, their calibration, and the calibrated conv map;
- :mod:`.libraries`: deqlib and torchdeq (optional, the ``bench`` extra) behind one signature;
- :mod:`.measurement`: the harness that measures one solve;
- :mod:`.comparison`: every problem x library x method (:func:`compare`);
- :mod:`.summary`: time ratios between the libraries, the recommended method per problem, and a
  recorded GPU run's calls;
- :mod:`.trained`: the headline, the solvers on DEQ-Transformer maps trained without and with
  the Jacobian penalty (``load_data`` / ``run_arm``, the shape of every experiment).
"""

from .comparison import Comparison, call_time_drift, compare, describe_problem, run_one
from .config import (KINDS, LIBRARIES, METHODS, PROBLEMS, ConvSpec, MDEQSpec, SolversExperiment, SyntheticSpec,
                     TransformerSpec)
from .libraries import Solver, library_solver, resolve_libraries, torchdeq_version
from .measurement import (CallRecorder, ImplicitBackward, Measurement, Reference, call_time, gradient_error,
                          measure_solve, ops_per_call, own_time_per_call, reference)
from .problems import (CONV_GROUPS, ConvMap, FlatMap, LayerMap, Problem, build_problem, calibrate_scale,
                       calibrated_conv_map, contraction_path)
from .summary import device_run, recommendations, time_ratios
from .trained import backward_gradient_error, measure_map, solve_cost, trained_problem

__all__ = [
    "METHODS", "LIBRARIES", "KINDS", "PROBLEMS", "SyntheticSpec", "ConvSpec", "MDEQSpec", "TransformerSpec",
    "SolversExperiment", "CONV_GROUPS", "ConvMap", "calibrate_scale", "calibrated_conv_map", "Problem", "FlatMap",
    "LayerMap", "contraction_path", "build_problem", "Solver", "torchdeq_version", "resolve_libraries",
    "library_solver", "CallRecorder", "call_time", "Measurement", "measure_solve", "own_time_per_call",
    "ops_per_call", "ImplicitBackward", "gradient_error", "Reference", "reference", "Comparison",
    "describe_problem", "call_time_drift", "run_one", "compare", "time_ratios", "recommendations", "device_run",
    "trained_problem", "solve_cost", "backward_gradient_error", "measure_map",
]
