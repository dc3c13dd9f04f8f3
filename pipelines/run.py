"""Run one experiment's notebook headless for the chosen profile.

    python -m pipelines.run synthetic [--profile small] [--set train.max_steps=3] [--out DIR]

Converts the percent-format source ``notebooks/NN_name.py`` with jupytext, executes it with
papermill (injecting ``profile``, ``overrides`` and ``output_dir``) in the ``notebooks/``
folder (the folder nbval runs it in), and writes ``DIR/notebook.ipynb`` beside the metrics,
curves and figures the notebook writes there. The paired ``.ipynb`` is never written.

Training runs checkpoint under ``DIR/checkpoints/<arm>`` (``$DEQLIB_RUN_DIR`` for the kernel):
a killed run leaves them, and the next run of the same configuration resumes each arm from its
last checkpoint (one of another configuration is not resumed from). They are removed once the
notebook has finished.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from deqlib.config import load_params, parse_override
from deqlib.data.download import DATA_ENV
from deqlib.numerics import PINNED_ENV
from deqlib.train import RUN_DIR_ENV

ROOT = Path(__file__).resolve().parent.parent
NUMERICS = ("pinned", "native")
NOTEBOOKS = {
    "synthetic": "01_synthetic.py",
    "cifar10": "03_cifar10.py",
    "solvers": "07_solvers.py",
    "wikitext": "02_wikitext.py",
}


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` while the block runs, then as before."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def kernel_environment(numerics: str = "pinned", extra: Mapping[str, str] | None = None) -> Iterator[None]:
    """The environment a notebook's kernel starts with (it inherits this process's): the
    pinned floating-point path of :mod:`deqlib.numerics` (``numerics="native"`` leaves the
    libraries to pick their kernels by CPU), an absolute ``$DEQLIB_DATA``, and ``extra``."""
    if numerics not in NUMERICS:
        raise ValueError(f"unknown numerics={numerics!r}; choose one of {list(NUMERICS)}")
    values = dict(PINNED_ENV) if numerics == "pinned" else {}
    values.update(extra or {})
    with absolute_data_env(), _environ(values):
        yield


@contextlib.contextmanager
def absolute_data_env() -> Iterator[None]:
    """``$DEQLIB_DATA`` made absolute (against the caller's working directory) while the block
    runs, then restored. The kernel runs in ``notebooks/``: a relative value would otherwise
    name a folder there, and a paper profile would download its data set into it."""
    value = os.environ.get(DATA_ENV, "")
    if not value or Path(value).expanduser().is_absolute():
        yield
        return
    with _environ({DATA_ENV: str(Path(value).expanduser().resolve())}):
        yield


def run(experiment: str, profile: str | None = None, overrides: dict | None = None,
        out: str | Path | None = None, params_path: str | Path | None = None, numerics: str = "pinned") -> Path:
    import jupytext
    import papermill

    if experiment not in NOTEBOOKS:
        raise SystemExit(f"unknown experiment {experiment!r}; known: {sorted(NOTEBOOKS)}")
    params_path = Path(params_path or ROOT / "params.yaml").resolve()
    if profile is None:
        profile = load_params(params_path).get("profile", "paper")
    out = Path(out or ROOT / "outputs" / experiment).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = ROOT / "notebooks" / NOTEBOOKS[experiment]
    checkpoints = out / "checkpoints"  # kept when a run is killed, so that the next one resumes
    nb = jupytext.read(source)
    nb.metadata.pop("jupytext", None)  # the executed copy is not paired with anything
    with tempfile.TemporaryDirectory() as tmp:
        src_ipynb = Path(tmp) / "input.ipynb"
        jupytext.write(nb, src_ipynb, fmt="ipynb")
        partial = out / ".notebook.partial.ipynb"
        # The kernel inherits this process's environment.
        with kernel_environment(numerics, {RUN_DIR_ENV: str(checkpoints)}):
            papermill.execute_notebook(
                str(src_ipynb), str(partial),
                parameters={"profile": profile, "overrides": dict(overrides or {}),
                            "output_dir": str(out), "params_path": str(params_path)},
                kernel_name="python3", language="python", cwd=str(source.parent),
                progress_bar=False, log_output=True,
            )
    final = out / "notebook.ipynb"
    os.replace(partial, final)  # a failed run leaves no executed notebook behind
    # Finished: the next run (new code, say) must train afresh, not resume a finished arm.
    shutil.rmtree(checkpoints, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=sorted(NOTEBOOKS))
    p.add_argument("--profile", choices=["paper", "small"], help="default: params.yaml's profile")
    p.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                   metavar="KEY=VALUE", help="override a parameter of the profile (repeatable)")
    p.add_argument("--out", help="output folder (default outputs/EXPERIMENT)")
    p.add_argument("--numerics", choices=NUMERICS, default="pinned",
                   help="pinned (default): one floating-point path on every x86-64 CPU with AVX2 "
                        "(deqlib.numerics); native: the fastest kernels of this CPU")
    args = p.parse_args(argv)
    path = run(args.experiment, args.profile, dict(args.overrides), args.out, numerics=args.numerics)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
