"""Re-run committed notebooks and compare their outputs at a numeric tolerance.

    python -m pipelines.nbcheck notebooks/02_wikitext.ipynb [...] --rtol 0.1 [--numerics native]

The tests check committed outputs bit for bit with nbval, on the pinned floating-point path of
:mod:`deqlib.numerics`. Where that path cannot hold (a CPU without AVX2, ARM, a GPU, another
build of torch), bits cannot match and nbval reports a wall of diffs. This check says instead
what was and was not reproduced: it executes each notebook as nbval does (a fresh kernel in
``notebooks/``, every cell in order), then compares the outputs of every cell not marked
``NBVAL_IGNORE_OUTPUT`` (printed text and the plain-text form of results): the words must be
the same, and each number within ``rtol`` (relative) or ``atol`` (absolute) of the committed
one. A cell that runs past ``--timeout`` seconds is named with the limit.

Exit status 0 when every compared cell agrees within the tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

IGNORE_MARK = "NBVAL_IGNORE_OUTPUT"
# A number as notebooks print them: 12, -3.5, 1e-08, 2.6e+03, 0.015 (a leading sign or dot too).
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class CellReport:
    """How one cell's outputs compared. ``index`` counts code cells from 1, as nbval does."""

    index: int
    status: str  # "identical", "within", "differs", "error", "timeout"
    max_rel: float = 0.0
    detail: str = ""


@dataclass
class NotebookReport:
    path: Path
    cells: list[CellReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status in ("identical", "within") for c in self.cells)

    def summary(self, rtol: float, atol: float) -> str:
        counts = {s: sum(c.status == s for c in self.cells) for s in ("identical", "within", "differs", "error",
                                                                      "timeout")}
        within = [c for c in self.cells if c.status == "within"]
        lines = [f"{self.path.name}: {len(self.cells)} cells compared; {counts['identical']} identical, "
                 f"{counts['within']} within rtol={rtol:g} / atol={atol:g}"
                 + (f" (largest relative difference {max(c.max_rel for c in within):.3g})" if within else "")
                 + f", {counts['differs']} differ, {counts['error'] + counts['timeout']} failed to run"]
        for c in self.cells:
            if c.status not in ("identical", "within"):
                lines.append(f"  code cell {c.index}: {c.status}: {c.detail}")
        return "\n".join(lines)


def _text(outputs: list[dict]) -> str:
    """The comparable text of a cell's outputs: stdout and the plain-text form of results
    (stderr, images and HTML are not compared, as in nbval's default)."""
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            parts.append("".join(out.get("text", "")))
        elif out.get("output_type") in ("execute_result", "display_data"):
            text = out.get("data", {}).get("text/plain")
            if text is not None and not out.get("data", {}).get("image/png"):
                parts.append("".join(text))
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    return "\n".join(parts)


def compare_text(expected: str, got: str, rtol: float, atol: float) -> tuple[str, float, str]:
    """``(status, largest relative difference, detail)`` of two outputs: ``identical``,
    ``within`` (the same words, numbers within tolerance) or ``differs``."""
    if expected == got:
        return "identical", 0.0, ""
    words_e, words_g = _NUMBER.split(expected), _NUMBER.split(got)
    nums_e, nums_g = _NUMBER.findall(expected), _NUMBER.findall(got)
    if [w.split() for w in words_e] != [w.split() for w in words_g] or len(nums_e) != len(nums_g):
        return "differs", math.inf, f"the text differs: expected {_clip(expected)!r}, got {_clip(got)!r}"
    worst, where = 0.0, ""
    for a_text, b_text in zip(nums_e, nums_g):
        a, b = float(a_text), float(b_text)
        diff = abs(a - b)
        rel = diff / abs(a) if a else (0.0 if diff == 0 else math.inf)
        if diff > atol and rel > worst:
            worst, where = rel, f"{a_text} -> {b_text}"
        if diff > atol + rtol * abs(a):
            return "differs", rel, f"{a_text} became {b_text} (relative difference {rel:.3g})"
    return "within", worst, where


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n] + "..."


def check_notebook(path: Path, rtol: float, atol: float, timeout: int, numerics: str = "pinned") -> NotebookReport:
    """Execute ``path``'s cells in its folder and compare each with its committed outputs."""
    import nbformat
    from nbclient import NotebookClient

    from pipelines.run import kernel_config, kernel_environment

    committed = nbformat.read(path, as_version=4)
    fresh = copy.deepcopy(committed)
    report = NotebookReport(path)
    code = [i for i, c in enumerate(fresh.cells) if c.cell_type == "code"]
    # The kernel listens on IPC sockets in a private folder, as in pipelines.run.
    with kernel_environment(numerics), kernel_config() as config:
        client = NotebookClient(fresh, kernel_name="python3", timeout=timeout, config=config,
                                resources={"metadata": {"path": str(path.resolve().parent)}})
        with client.setup_kernel():
            _compare_cells(client, committed, fresh, code, report, rtol, atol, timeout)
    return report


def _compare_cells(client, committed, fresh, code: list[int], report: NotebookReport, rtol: float, atol: float,
                   timeout: int) -> None:
    """Execute the code cells ``code`` of ``fresh`` in order on ``client``'s kernel, adding each
    one's comparison with ``committed`` to ``report``; stop at an error or a timeout."""
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    for n, i in enumerate(code, start=1):
        cell = fresh.cells[i]
        try:
            client.execute_cell(cell, i)
        except CellTimeoutError:
            report.cells.append(CellReport(n, "timeout", math.inf,
                                           f"ran past the {timeout} s limit per cell (--timeout)"))
            break
        except CellExecutionError as err:
            report.cells.append(CellReport(n, "error", math.inf, str(err).strip().splitlines()[-1]))
            break
        if IGNORE_MARK in cell.source:
            continue
        status, rel, detail = compare_text(_text(committed.cells[i].outputs), _text(cell.outputs), rtol, atol)
        report.cells.append(CellReport(n, status, rel, detail))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.nbcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance per number (default 0)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance per number (default 0)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per cell (default 1200)")
    p.add_argument("--numerics", choices=("pinned", "native"), default="pinned")
    args = p.parse_args(argv)
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            p.error(f"--{name} must be a finite number >= 0, got {value}")
    if args.timeout < 1:
        p.error(f"--timeout must be >= 1 second, got {args.timeout}")
    missing = [str(nb) for nb in args.notebooks if not nb.is_file()]
    if missing:
        p.error(f"no such notebook: {', '.join(missing)}")
    ok = True
    for nb in args.notebooks:
        report = check_notebook(nb, args.rtol, args.atol, args.timeout, args.numerics)
        print(report.summary(args.rtol, args.atol), flush=True)
        ok &= report.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
