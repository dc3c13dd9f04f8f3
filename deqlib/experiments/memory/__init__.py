"""Notebook 05: what a DEQ costs in memory and time, and what Jacobian regularization changes.

Measurement only, no training. For the DEQ-Transformer and the MDEQ: a training step's memory
against its effective depth (the DEQ's forward NFE with the implicit, phantom and unrolled
backward; explicit weight-tied and untied stacks), Table 5's rows (the penalty's increment on a
step that draws it, the solvers' own buffers at the paper's NFE), and the step time against NFE
with the penalty at its frequency p.

One job per module:

- :mod:`.config`: the experiment (params.yaml's ``memory`` section);
- :mod:`.steps`: the one harness: a training step of either model differentiated any way, and
  its measurement (memory, time, the solvers' buffers);
- :mod:`.run`: one model's sweeps, Table 5's rows and timings (:func:`run_arm`);
- :mod:`.summary`: ratios beside the paper's, the verdicts, the committed GPU figures.
"""

from .config import EXPLICIT, MODELS, MODES, MDEQSpec, MemoryEval, MemoryExperiment, TransformerSpec
from .run import (TABLE_ROWS, load_data, make_steps, memory_sweep, row_nfe, run_arm, step_times, table_rows,
                  timed_configs)
from .steps import (METHODS, BufferProbe, MDEQSteps, StepFn, TransformerSteps, measure_memory, pick_device,
                    solver_buffers, time_rounds)
from .summary import (CLAIMS, by_row, device_figures, expected_times, flatness, growth, memory_verdicts,
                      penalty_increments, per_layer_saved_mb, sweep_table, table5, time_table, time_verdicts)

__all__ = [
    "MODELS", "MODES", "EXPLICIT", "TransformerSpec", "MDEQSpec", "MemoryEval", "MemoryExperiment", "METHODS",
    "StepFn", "BufferProbe", "TransformerSteps", "MDEQSteps", "measure_memory", "solver_buffers", "time_rounds",
    "pick_device", "TABLE_ROWS", "load_data", "make_steps", "memory_sweep", "table_rows", "timed_configs",
    "step_times", "run_arm", "row_nfe", "CLAIMS", "by_row", "sweep_table", "flatness", "growth", "per_layer_saved_mb",
    "table5", "penalty_increments", "time_table", "expected_times", "memory_verdicts", "time_verdicts",
    "device_figures",
]
