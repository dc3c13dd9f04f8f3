"""Re-execute paired notebooks with their default (small) parameters and save the outputs.

    python -m pipelines.refresh [notebooks/01_synthetic.py ...]   # default: all of them

Reads the percent ``.py`` source, executes it in ``notebooks/`` (where nbval runs it) on the
pinned floating-point path of :mod:`deqlib.numerics` (as the notebook tests do) and
writes the paired ``.ipynb`` through jupytext, so the pair stays in sync. Papermill is not
used here: its injected-parameters cell would leak into the ``.py`` on the next sync.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def refresh(source: Path) -> Path:
    import jupytext
    from nbclient import NotebookClient

    from pipelines.run import kernel_config, kernel_environment

    source = source.resolve()
    nb = jupytext.read(source)
    # The kernel runs in notebooks/ on the pinned numeric path, as in pipelines.run and nbval,
    # and listens on IPC sockets in a private folder, as in pipelines.run.
    with kernel_environment("pinned"), kernel_config() as config:
        NotebookClient(nb, kernel_name="python3", timeout=1800, config=config,
                       resources={"metadata": {"path": str(source.parent)}}).execute()
    target = source.with_suffix(".ipynb")
    jupytext.write(nb, target, fmt="ipynb")
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sources = [Path(a) for a in args] or sorted((ROOT / "notebooks").glob("[0-9]*.py"))
    for src in sources:
        print(f"wrote {refresh(src)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
