"""Shared fixtures: small seeded maps with known fixed points; the data-slice check; the
numeric path and speed of this machine for the notebook checks."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deqlib.numerics import pinned_environ

ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT = ROOT / "tests" / "scripts" / "numeric_fingerprint.py"
RTOL_ENV = "DEQLIB_NOTEBOOK_RTOL"  # compare notebook outputs at this relative tolerance instead of bits
DEFAULT_RTOL = "0.1"  # where the pinned path cannot hold; see the README for the measured variation
# Wall time of FINGERPRINT (6 steps, pinned) on the machine that made the committed notebooks,
# and the per-cell limit there: a slower machine (or one under load) gets proportionally more.
REFERENCE_FINGERPRINT_S = 4.0
BASE_CELL_TIMEOUT_S = 1200


def run_fingerprint(env: dict, steps: int = 6, prefix: tuple[str, ...] = ()) -> tuple[dict, dict, float]:
    """Run FINGERPRINT in a fresh process: ``({model: hash}, numeric path, wall seconds)``."""
    t0 = time.perf_counter()
    proc = subprocess.run([*prefix, sys.executable, str(FINGERPRINT), str(steps)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    hashes = dict(line.split() for line in lines[:-1])
    return hashes, json.loads(lines[-1]), seconds


@pytest.fixture(scope="session")
def numeric_path_and_speed() -> tuple[dict, float]:
    env = pinned_environ()
    env["PYTHONPATH"] = str(ROOT)
    _, path, seconds = run_fingerprint(env)
    return path, seconds


@pytest.fixture(scope="session")
def numeric_path(numeric_path_and_speed) -> dict:
    """What a process started on the pinned path reports (``deqlib.numerics.describe``)."""
    return numeric_path_and_speed[0]


@pytest.fixture(scope="session")
def cell_timeout(numeric_path_and_speed) -> int:
    """Seconds per notebook cell: the base limit scaled by how much slower than the reference
    machine this one ran the fingerprint (never below the base)."""
    slowness = numeric_path_and_speed[1] / REFERENCE_FINGERPRINT_S
    return int(math.ceil(BASE_CELL_TIMEOUT_S * max(1.0, slowness)))


def skip_without_slice(root: str) -> None:
    """Skip a test that reads the real data slice at ``root`` (relative to the repository, as
    ``params.yaml`` writes it) when it is not there, naming the path.

    The slices live beside the checkout in ``../shared/data`` (README, "Data"); a clone made
    anywhere else has none, and there is no network to fetch them. ``""`` (meaning
    ``$DEQLIB_DATA``) is not a slice and never skips.
    """
    if root and not (ROOT / root).is_dir():
        pytest.skip(f"needs the data slice {root} (relative to the repository), which is not here")


def linear_map(dim: int, rho: float, batch: int = 4, seed: int = 0, dtype=torch.float64):
    """f(z) = z W^T + x with spectral radius ``rho``; returns (f, x, exact fixed point)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=dtype)
    W = W * (rho / torch.linalg.eigvals(W).abs().max())
    x = torch.randn(batch, dim, generator=g, dtype=dtype)
    # z = z W^T + x  <=>  z (I - W^T) = x  <=>  (I - W) z^T = x^T
    exact = torch.linalg.solve(torch.eye(dim, dtype=dtype) - W, x.T).T
    return (lambda z: z @ W.T + x), x, exact


@pytest.fixture
def contractive_linear():
    return linear_map(40, 0.8)


@pytest.fixture
def slow_linear():
    return linear_map(60, 0.97, seed=1)
