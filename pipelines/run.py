"""Run one experiment's notebook headless for the chosen profile.

    python -m pipelines.run synthetic [--profile small] [--set train.max_steps=3] [--out DIR]

Checks the configuration first (the experiment's config class, as the notebook builds it): a
bad key or value is one line naming it, exit status 2, before any kernel starts. Then converts
the percent-format source ``notebooks/NN_name.py`` with jupytext and executes it with papermill
(injecting ``profile``, ``overrides`` and ``output_dir``) in the ``notebooks/`` folder (the
folder nbval runs it in). The notebook writes its metrics, curves and figures into a staging
folder inside ``DIR``; only when it has finished, and its ``metrics.json`` holds a finite
number, are they and the executed ``notebook.ipynb`` moved into ``DIR``: a failed run leaves
``DIR`` as it was. The paired ``.ipynb`` is never written.

One run at a time per ``DIR``: a run holds an advisory lock (``fcntl.flock``) on ``DIR/.run.lock``
and a second one refuses at once; the system releases it when the process ends, killed or not.

Training runs checkpoint under ``DIR/checkpoints/<arm>`` (``$DEQLIB_RUN_DIR`` for the kernel):
a killed run leaves them, and the next run of the same configuration resumes each arm from its
last checkpoint (one of another configuration is not resumed from). The checkpoint files the
arms wrote are removed once the notebook has finished; anything else under ``checkpoints/``
stays.

The kernel listens on IPC sockets in a private temporary folder (TCP, which another local user
can reach, only where the platform has no IPC).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

try:
    import fcntl
except ImportError:  # Windows: no advisory locks of this kind; runs are not serialized there
    fcntl = None  # type: ignore[assignment]

from deqlib.config import load_experiment, load_params, parse_override
from deqlib.data.download import DATA_ENV
from deqlib.numerics import PINNED_ENV
from deqlib.experiments.core import RUN_DIR_ENV, remove_pipeline_checkpoints

ROOT = Path(__file__).resolve().parent.parent
PROG = "python -m pipelines.run"
NUMERICS = ("pinned", "native")
NOTEBOOKS = {
    "synthetic": "01_synthetic.py",
    "cifar10": "03_cifar10.py",
    "imagenet": "04_imagenet.py",
    "solvers": "07_solvers.py",
    "wikitext": "02_wikitext.py",
    "memory": "05_memory.py",
    "weight_decay": "06_weight_decay.py",
}
# The config class each notebook builds with deqlib.config.load_experiment (module:class).
CONFIGS = {
    "synthetic": "deqlib.experiments.synthetic:SyntheticExperiment",
    "cifar10": "deqlib.experiments.cifar:CifarExperiment",
    "imagenet": "deqlib.experiments.imagenet:ImageNetExperiment",
    "solvers": "deqlib.experiments.solver_study:SolversExperiment",
    "wikitext": "deqlib.experiments.wikitext:WikiTextExperiment",
    "memory": "deqlib.experiments.memory:MemoryExperiment",
    "weight_decay": "deqlib.experiments.weight_decay:WeightDecayExperiment",
}
STAGING = ".run.staging"  # inside the output folder: what the notebook writes until it finishes
LOCK = ".run.lock"  # inside the output folder: one run at a time


class RunError(Exception):
    """A run refused or failed for a reason its message says in one line; ``status`` is the
    command's exit status."""

    status = 1


class ConfigError(RunError, ValueError):
    """A bad experiment, profile, parameter file, key or value: found before a kernel starts."""

    status = 2


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


@contextlib.contextmanager
def kernel_config() -> Iterator[Any]:
    """The traitlets config of the kernel manager that papermill and nbclient start a kernel
    with: IPC transport, its sockets and connection file in a private temporary folder (mode
    0700, removed afterwards). Over TCP the kernel's traffic (code and outputs) is plain text on
    a localhost port that any local user can reach, and ipykernel warns so on every start.

    ZeroMQ has no IPC transport on Windows: there the config is empty and the kernel keeps TCP.
    """
    import zmq
    from traitlets.config import Config

    if not zmq.has("ipc"):
        yield Config()
        return
    # A short prefix: a socket path must fit in ~100 bytes (sun_path), a long $TMPDIR included.
    with tempfile.TemporaryDirectory(prefix="nbk-") as folder:
        yield Config({"KernelManager": {"transport": "ipc", "ip": str(Path(folder) / "ipc"),
                                        "connection_file": str(Path(folder) / "kernel.json")}})


def check_config(experiment: str, profile: str | None, overrides: Mapping[str, Any] | None,
                 params_path: str | Path, numerics: str = "pinned") -> tuple[str, Any]:
    """``(profile, config)``: the experiment's config built and validated as its notebook builds
    it, ``profile`` None meaning ``params.yaml``'s. Raises :class:`ConfigError` naming the bad
    experiment, profile, file, key or value: before a kernel starts (8-14 s) and papermill wraps
    the message in a long traceback.
    """
    if experiment not in NOTEBOOKS:
        raise ConfigError(f"unknown experiment={experiment!r}; choose one of {sorted(NOTEBOOKS)}")
    if numerics not in NUMERICS:
        raise ConfigError(f"unknown numerics={numerics!r}; choose one of {list(NUMERICS)}")
    module, name = CONFIGS[experiment].split(":")
    cls = getattr(importlib.import_module(module), name)
    try:
        if profile is None:
            profile = load_params(params_path).get("profile", "paper")
        return profile, load_experiment(cls, experiment, profile, dict(overrides or {}), params_path)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot read {params_path}: {' '.join(str(err).split())}") from None
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        raise ConfigError(" ".join(str(err).split()) or repr(err)) from None


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold an advisory lock on ``out/.run.lock`` while the block runs; raise :class:`RunError`
    at once, naming the folder and the lock, when another run holds it.

    ``flock`` belongs to the open file: the system releases it when the process ends, however it
    ends, so a killed run leaves no stale lock (only, at most, the file, which the next run
    reuses). The file is removed while still held; a run that opened it just before locks a
    removed file, notices (not the file at the path any more) and tries again.
    """
    path = out / LOCK
    if fcntl is None:
        yield path
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by the kernel
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{out} is in use by another run (it holds the lock {path}); wait for it to end "
                           "or give another --out") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _finite_numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)) and math.isfinite(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _finite_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _finite_numbers(v)


def check_metrics(path: Path) -> None:
    """Raise :class:`RunError` unless ``path`` (the notebook's ``metrics.json``) holds a finite
    number: NaN and infinities are written as null, so a run whose every arm diverged would
    otherwise finish with exit status 0 and every metric null."""
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"the notebook finished but wrote no {path.name}") from None
    except ValueError as err:
        raise RunError(f"the notebook's {path.name} is not JSON ({err})") from None
    if next(_finite_numbers(metrics), None) is None:
        raise RunError(f"no finite number in the notebook's {path.name}: every metric is NaN, infinite or "
                       "missing (did every arm diverge?); the output folder is left as it was")


def _publish(staging: Path, out: Path, last: str) -> None:
    """Move everything in ``staging`` into ``out`` (replacing files of the same name), ``last``
    at the end: each file appears whole (``os.replace``)."""
    entries = sorted(staging.iterdir(), key=lambda e: (e.name == last, e.name))
    for entry in entries:
        dest = out / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)


def run(experiment: str, profile: str | None = None, overrides: dict | None = None,
        out: str | Path | None = None, params_path: str | Path | None = None, numerics: str = "pinned") -> Path:
    """Execute ``experiment``'s notebook into ``out`` (default ``outputs/EXPERIMENT``) and
    return the executed notebook's path. Raises :class:`ConfigError` (a bad configuration,
    before a kernel starts), :class:`RunError` (``out`` in use by another run; no finite metric)
    or papermill's error (a cell failed); on any failure ``out`` is as it was, apart from the
    arms' checkpoints under ``out/checkpoints`` that the next run resumes from."""
    import jupytext
    import papermill

    params_path = Path(params_path or ROOT / "params.yaml").resolve()
    profile, _ = check_config(experiment, profile, overrides, params_path, numerics)
    out = Path(out or ROOT / "outputs" / experiment).resolve()
    source = ROOT / "notebooks" / NOTEBOOKS[experiment]
    checkpoints = out / "checkpoints"  # kept when a run fails or is killed, so that the next one resumes
    nb = jupytext.read(source)
    nb.metadata.pop("jupytext", None)  # the executed copy is not paired with anything
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        staging = out / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
        staging.mkdir()
        final = "notebook.ipynb"
        try:
            with tempfile.TemporaryDirectory() as tmp, kernel_config() as config:
                src_ipynb = Path(tmp) / "input.ipynb"
                jupytext.write(nb, src_ipynb, fmt="ipynb")
                # The kernel inherits this process's environment.
                with kernel_environment(numerics, {RUN_DIR_ENV: str(checkpoints)}):
                    papermill.execute_notebook(
                        str(src_ipynb), str(staging / final),
                        parameters={"profile": profile, "overrides": dict(overrides or {}),
                                    "output_dir": str(staging), "params_path": str(params_path)},
                        kernel_name="python3", language="python", cwd=str(source.parent),
                        progress_bar=False, log_output=True, config=config,
                    )
            check_metrics(staging / "metrics.json")
            _publish(staging, out, last=final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # Finished: the next run (new code, say) must train afresh, not resume a finished arm.
        remove_pipeline_checkpoints(checkpoints)
    return out / final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
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
    try:
        path = run(args.experiment, args.profile, dict(args.overrides), args.out, numerics=args.numerics)
    except RunError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return err.status
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
