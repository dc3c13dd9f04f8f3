"""Benchmarks that print measured figures (never asserted in tests): ``python -m deqlib.bench
solvers|mdeq|transformer|compare`` (:mod:`.cli`, whose help says what each prints).

- :mod:`.solver_cost`: :func:`bench_solvers`, each solver's cost beyond its calls of ``f``;
- :mod:`.model_step`: :func:`bench_mdeq`, :func:`bench_transformer`, a training step's time and
  memory without and with the Jacobian penalty;
- :mod:`.comparison`: :func:`bench_compare`, notebook 07's comparison without Jupyter;
- :mod:`.environment`: the device, named in each report, and the checkout's params.yaml.
"""

from .cli import main
from .comparison import bench_compare
from .model_step import bench_mdeq, bench_transformer
from .solver_cost import bench_solvers

__all__ = ["bench_solvers", "bench_mdeq", "bench_transformer", "bench_compare", "main"]
