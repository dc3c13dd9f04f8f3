"""``python -m deqlib.bench compare``: notebook 07's comparison without Jupyter."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ..config import load_experiment, to_dict
from ..experiments.solver_study import SolversExperiment, compare, time_ratios, torchdeq_version
from .environment import CHECKOUT_PARAMS, device_name

__all__ = ["bench_compare"]


def bench_compare(profile: str = "paper", overrides: dict | None = None,
                  params_path: str | Path | None = None) -> dict:
    """Notebook 07's comparison (deqlib's solvers against torchdeq's) outside a notebook, for
    machines without Jupyter: the same :func:`deqlib.experiments.solver_study.compare`, with
    ``overrides`` on the ``solvers`` section's ``profile`` (of the checkout's params.yaml unless
    ``params_path``). Returns the problems, rows and residual curves, and deqlib's time over
    torchdeq's per method (``ratios``)."""
    exp = load_experiment(SolversExperiment, "solvers", profile, overrides or {}, params_path or CHECKOUT_PARAMS)
    dev = exp.torch_device()
    result = compare(exp, log=print)
    return {"profile": profile, "overrides": dict(overrides or {}), "config": to_dict(exp),
            "device": device_name(dev),
            "torch": torch.__version__, "torchdeq": torchdeq_version(), "note": result.note,
            **{k: v for k, v in asdict(result).items() if k in ("problems", "rows", "curves")},
            "ratios": {d: time_ratios(result.rows, d) for d in ("fwd", "bwd")}}
