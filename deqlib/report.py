"""Results beside the paper's: the reference numbers (with sources), metric and curve files
that DVC reads, and one plotting style."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["PAPER", "write_metrics", "write_curves", "use_style", "make_output_dir"]

# Versioned reference numbers; each with where it comes from.
PAPER: dict[str, dict[str, Any]] = {
    "synthetic.claim_fit": {
        "value": "all gamma fit the target",
        "source": "supplement A.1 and Figure 5 (Bai, Koltun, Kolter 2021)",
    },
    "synthetic.claim_flat": {
        "value": "larger gamma flattens z_out = f(z; x) around the fixed point and needs fewer NFEs",
        "source": "supplement A.1, Figure 5 caption",
    },
    "synthetic.noise_var": {"value": 0.05, "source": "supplement A.1: delta ~ N(0, 0.05)"},
    "synthetic.nfe_threshold": {"value": "6 / 6", "source": "supplement Table 4, Synthetic column"},
    "solvers.forward_eps": {"value": 1e-3, "source": "supplement Table 4 (relative residual, A.5)"},
    "solvers.backward_eps": {
        "value": 1e-4,
        "source": "supplement Table 4 (the released code uses 1e-3 for both)",
    },
    "solvers.anderson": {
        "value": "window m = 5-6, lam = 1e-4, beta = 1",
        "source": "official code (locuslab/deq v2.0)",
    },
    "solvers.broyden": {
        "value": "inverse Jacobian -I + U V^T, first step plain, lowest-residual iterate returned",
        "source": "official code (locuslab/deq v2.0); paper section 3",
    },
    "cifar10.mdeq": {"value": {"accuracy": 93.6, "std": 0.2, "nfe": 17},
                     "source": "Table 2 (CIFAR-10, 5 runs): MDEQ"},
    "cifar10.mdeq_hard_stop": {"value": {"accuracy": 89.1, "nfe": 6},
                               "source": "Table 2: MDEQ hard-stopped at 6 NFE"},
    "cifar10.mdeq_jr": {"value": {"accuracy": 93.1, "std": 0.3, "nfe": 6},
                        "source": "Table 2 (CIFAR-10, 5 runs): MDEQ + JR"},
    "cifar10.resnet18": {"value": {"accuracy": 93.0}, "source": "Table 2: ResNet-18 (explicit network)"},
    "cifar10.table3": {"value": {0.1: [82.4, 89.7, 91.9, 92.3, 92.7, 92.9],
                                 0.6: [85.8, 91.5, 92.7, 93.0, 93.0, 93.1],
                                 1.2: [84.4, 89.6, 92.2, 92.6, 92.7, 92.7]},
                       "source": "Table 3: accuracy (%) of JR models (gamma = key) evaluated at NFE 1..6"},
    "cifar10.nfe_threshold": {"value": "7 / 8", "source": "supplement Table 4, CIFAR-10 column"},
}


def make_output_dir(path: str | os.PathLike | None) -> Path | None:
    """Create and return ``path`` (None or "" means: write nothing)."""
    if not path:
        return None
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(out: Path | None, metrics: Mapping[str, Any], name: str = "metrics.json") -> None:
    """A DVC metrics file (JSON; non-finite numbers become null)."""
    if out is not None:
        _atomic_write_text(out / name, json.dumps(_clean(metrics), indent=2, sort_keys=True) + "\n")


def write_curves(out: Path | None, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """A DVC plots file (CSV with a header; the union of the rows' keys)."""
    if out is None:
        return
    rows = list(rows)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = out / f".{name}.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / name)


def use_style() -> None:
    """The suite's one plotting style."""
    import matplotlib

    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.dpi": 80, "savefig.dpi": 120, "figure.autolayout": True})
