"""The metric and curve files DVC reads, written atomically, and the output folder."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_open

__all__ = ["make_output_dir", "write_metrics", "write_curves"]


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
