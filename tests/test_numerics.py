"""The pinned floating-point path (deqlib.numerics): a short training of each model family gives
the same parameter bits whatever the outer settings and CPU, and different bits off the path.

Each run is a fresh process (the settings are read when the libraries load) running
``tests/scripts/numeric_fingerprint.py``: a few steps of the synthetic DEQ, an MDEQ and a
DEQ-Transformer through the project's own training loop, Jacobian penalty included.
"""

import os
import shutil

import pytest

from conftest import ROOT, run_fingerprint
from deqlib.numerics import PINNED_ENV, pinned_environ

# Settings that change the bits of an unpinned run on some CPU (each seen to, on this kind of
# machine, in a plain Adam + conv + GroupNorm run): the pinned path must override all of them.
HOSTILE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "SSE41",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _env(base: dict | None = None, pinned: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV}
    env.update(base or {})
    env["PYTHONPATH"] = str(ROOT)
    return pinned_environ(env) if pinned else env


def test_a_pinned_process_is_on_the_pinned_path(numeric_path):
    if numeric_path["aten_capability"] != "AVX2":
        pytest.skip(f"this CPU cannot run ATen's AVX2 kernels (it reports {numeric_path['aten_capability']}): "
                    "the notebook checks compare at a tolerance here")
    assert numeric_path["pinned"] is True, numeric_path
    assert numeric_path["threads"] == 2 and numeric_path["nnpack"] is False


def test_pinned_bits_do_not_depend_on_the_outer_settings():
    """What a user's shell or machine sets (another ISA, MKL branch, thread count) is
    overridden: the same bits as from a clean environment."""
    clean, _, _ = run_fingerprint(_env())
    hostile, path, _ = run_fingerprint(_env(HOSTILE))
    assert path["pinned"] or path["aten_capability"] != "AVX2", path
    assert hostile == clean


def test_unpinned_settings_change_the_bits():
    """Off the pinned path the same code gives other bits: the levers are real (so the test
    above could fail). Where this machine's own ISA is the pinned one, native and pinned may
    agree; the generic kernels (ATEN_CPU_CAPABILITY=default) still differ."""
    pinned, _, _ = run_fingerprint(_env())
    generic, path, _ = run_fingerprint(_env({"ATEN_CPU_CAPABILITY": "default"}, pinned=False))
    if path["aten_capability"] != "DEFAULT":
        pytest.skip(f"ATEN_CPU_CAPABILITY=default was not honoured here ({path})")
    assert generic != pinned
    assert any(generic[m] != pinned[m] for m in ("mdeq", "transformer"))


@pytest.mark.parametrize("cpu", ["Haswell-v4", "EPYC-Rome-v2"])
def test_pinned_bits_match_on_another_cpu(cpu):
    """The same training under user-mode emulation of another CPU (qemu-x86_64 -cpu: an Intel
    Haswell or an AMD Rome, AVX2 without AVX-512, other cache sizes and vendor) gives this
    machine's bits on the pinned path. Needs qemu-user (Debian: ``apt-get install qemu-user``);
    about 40 s per CPU."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user): no other CPU to compare with")
    here, _, _ = run_fingerprint(_env())
    there, path, _ = run_fingerprint(_env(), prefix=(qemu, "-cpu", cpu))
    assert path["aten_capability"] == "AVX2" and path["pinned"], path
    assert there == here, f"{cpu}: {there} != this machine's {here}"
