"""What the comparison's rows say: deqlib's time over torchdeq's per method, and which
method to use per problem."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ...checks import check_real
from .config import METHODS

__all__ = ["time_ratios", "recommendations", "device_run"]


def _geomean(values: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def time_ratios(rows: Sequence[dict], direction: str = "fwd") -> dict[str, dict]:
    """Per method: geometric mean over problems of deqlib's time / torchdeq's, over all
    problems and over those where both converged (None where there is nothing to compare)."""
    by = {(r["problem"], r["library"], r["method"]): r for r in rows}
    out = {}
    for method in METHODS:
        every, both = [], []
        for (problem, lib, m), r in by.items():
            other = by.get((problem, "torchdeq", m))
            if lib != "deqlib" or m != method or other is None:
                continue
            ratio = r[f"{direction}_time_s"] / other[f"{direction}_time_s"]
            every.append(ratio)
            if r[f"{direction}_converged"] and other[f"{direction}_converged"]:
                both.append(ratio)
        out[method] = {"all": _geomean(every), "both_converged": _geomean(both),
                       "n_all": len(every), "n_both_converged": len(both)}
    return out


def recommendations(rows: Sequence[dict], library: str = "deqlib", min_saving: float = 1.3) -> list[dict]:
    """Per problem, which ``library`` method to use, from NFE only (deterministic).

    Among methods that converged forward and backward, take the one with the fewest calls in
    all (ties go to the simpler method, in :data:`METHODS` order). An accelerated method is
    recommended over plain iteration only when it saves at least ``min_saving`` times the
    calls (or plain iteration did not converge): each of its iterations costs more than a call
    of ``f`` (about 1.3x a call at CIFAR size on CPU, the measured overhead), which a smaller
    saving does not pay back.
    """
    check_real("min_saving", min_saving, minimum=1)
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        cand = [r for r in rows if r["problem"] == problem and r["library"] == library]
        ok = [r for r in cand if r["fwd_converged"] and r["bwd_converged"]]
        calls = {r["method"]: r["fwd_nfe"] + r["bwd_nfe"] for r in ok}
        if not ok:
            out.append({"problem": problem, "use": "none converged", "calls fwd+bwd": None,
                        "plain iteration calls": None, "saving": None})
            continue
        best = min(ok, key=lambda r: (calls[r["method"]], METHODS.index(r["method"])))["method"]
        plain = calls.get("fixed_point")
        saving = plain / calls[best] if plain is not None else math.inf
        use = best if saving >= min_saving else "fixed_point"
        out.append({"problem": problem, "use": use, "calls fwd+bwd": calls[use],
                    "plain iteration calls": plain if plain is not None else "not converged",
                    "saving": round(saving, 1) if plain is not None else None})
    return out


def device_run(results_md: str, compare: dict) -> dict:
    """What a recorded GPU run of the comparison (``python -m deqlib.bench compare --json``)
    says, for a short section of the notebook: ``device`` (as the run recorded it), ``commit``
    (the deqlib commit ``results_md``, the run's write-up, names; None if it names none) and
    ``rows``: per problem and method the calls of ``f`` forward + backward for each library, a
    ``*`` marking a solve that did not converge."""
    import re

    found = re.search(r"deqlib as of\s+commit\s+`([0-9a-f]+)`", results_md)
    by = {(r["problem"], r["library"], r["method"]): r for r in compare["rows"]}
    rows = []
    for problem in compare["config"]["problems"]:
        for method in compare["config"]["methods"]:
            row = {"problem": problem, "method": method}
            for lib in compare["config"]["libraries"]:
                r = by.get((problem, lib, method))
                if r is not None:
                    mark = "" if r["fwd_converged"] and r["bwd_converged"] else "*"
                    row[lib] = f"{r['fwd_nfe']} + {r['bwd_nfe']}{mark}"
            rows.append(row)
    return {"device": compare.get("device", "unknown"), "commit": found.group(1) if found else None, "rows": rows}
