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

from .atomic import atomic_open

__all__ = ["PAPER", "write_metrics", "write_curves", "use_style", "make_output_dir", "print_setup"]

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
    # WikiText-103, Table 1 / Table 5: test perplexity, train / valid NFE, training time relative
    # to Transformer-XL, memory at batch 15 (excluding embeddings).
    "wikitext.explicit": {
        "value": {"ppl": 24.1, "train_nfe": None, "valid_nfe": None, "t_train": 1.0, "memory_gb": 9.0},
        "source": "Table 1 / Table 5: Transformer-XL, 18 layers (110M)",
    },
    "wikitext.post_ln": {
        "value": {"ppl": 24.0, "train_nfe": 30, "valid_nfe": 30, "t_train": 3.1, "memory_gb": 3.9},
        "source": "Table 1 / Table 5: DEQ-Transformer Post-LN (98M)",
    },
    "wikitext.post_ln_early_stop": {
        "value": {"ppl": 29.2, "train_nfe": 30, "valid_nfe": 12, "t_train": 3.1, "memory_gb": 3.9},
        "source": "Table 1 / Table 5: DEQ-Transformer Post-LN hard-stopped at 12 NFE at inference",
    },
    "wikitext.pre_ln": {
        "value": {"ppl": "diverged", "train_nfe": 30, "valid_nfe": None, "t_train": None, "memory_gb": None},
        "source": "Table 5: DEQ Pre-LN without JR",
    },
    "wikitext.pre_ln_jr": {
        "value": {"ppl": 24.5, "train_nfe": 14, "valid_nfe": 14, "t_train": 1.5, "memory_gb": 4.8},
        "source": "Table 5 (1.6x in Table 1): DEQ Pre-LN + JR",
    },
    "wikitext.post_ln_jr": {
        "value": {"ppl": 24.9, "train_nfe": 13, "valid_nfe": 12, "t_train": 1.4, "memory_gb": 4.8},
        "source": "Table 5 (1.5x in Table 1): DEQ Post-LN + JR",
    },
    "wikitext.claim_jr_memory": {
        "value": "JR adds about 25% training memory (3.9 -> 4.8 GB); the DEQ uses about half the memory of Transformer-XL",
        "source": "supplement B.1; Table 1",
    },
    "wikitext.settings": {
        "value": "23 epochs, batch 60, Adam 2.5e-4 with 1 epoch warm-up, cosine, d_model 700, seq 150, "
                 "dropout 0.06, weight norm, thresholds 12/12, gamma 1.6 -> 2.5, p 0.35",
        "source": "supplement Table 4, WikiText-103 column",
    },
}


def make_output_dir(path: str | os.PathLike | None) -> Path | None:
    """Create and return ``path`` (None or "" means: write nothing)."""
    if not path:
        return None
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def print_setup(profile: str, cfg: Mapping[str, Any], penalty: str = "Jacobian penalty",
                penalty_hides: Iterable[str] = ()) -> None:
    """Print a training notebook's setup, one line per block of its config (``to_dict`` of an
    experiment with ``data``, ``model``, ``train`` and ``eval``): data, model, training, the
    forward and backward solvers, the Jacobian penalty (labelled ``penalty``, without the keys
    in ``penalty_hides``, e.g. a gamma the notebook sweeps, nor an unset ``adaptive``: a fixed
    schedule's line reads as before there was an adaptive policy) and evaluation."""
    train = cfg["train"]
    hidden = set(penalty_hides) | ({"adaptive"} if train["jacobian"].get("adaptive") is None else set())
    setup = {
        "data": cfg["data"],
        "model": cfg["model"],
        "train": {k: v for k, v in train.items() if k not in ("forward", "backward", "jacobian")},
        "forward solver": train["forward"],
        "backward solver": train["backward"],
        penalty: {k: v for k, v in train["jacobian"].items() if k not in hidden},
        "evaluation": cfg["eval"],
    }
    print(f"profile: {profile}")
    for name, block in setup.items():
        print(f"{name:>17}: {block}")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


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
    with atomic_open(out / name, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def use_style() -> None:
    """The suite's one plotting style."""
    import matplotlib

    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.dpi": 80, "savefig.dpi": 120, "figure.autolayout": True})
