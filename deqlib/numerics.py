"""One floating-point path on every x86-64 CPU with AVX2, so that a CPU run's bits do not
depend on which CPU ran it.

Three libraries choose kernels by CPU, and a different kernel sums in a different order, which
changes the last bits of a result; a few hundred training steps turn that into different
perplexities and verdicts. Each is pinned here:

- ATen (PyTorch's own elementwise ops, reductions, norms, the optimizers) picks the widest
  vector ISA the CPU has: ``ATEN_CPU_CAPABILITY=avx2`` fixes it (8-lane floats everywhere).
- oneMKL (matrix products, ``linalg``) picks a code branch by ISA and blockings by cache size:
  ``MKL_CBWR=COMPATIBLE`` selects its reproducibility mode on the SSE2 branch, the one branch
  MKL supports on Intel and non-Intel processors alike (its ``AVX2`` branch falls back to
  ``AUTO``, i.e. CPU-dependent dispatch, on non-Intel CPUs); ``MKL_DYNAMIC=FALSE`` keeps its
  thread count fixed.
- oneDNN (convolutions) picks its kernels by ISA: ``ONEDNN_MAX_CPU_ISA=AVX2`` fixes them. Its
  blockings also read the cache sizes; convolutions of this project's shapes, forward and
  backward, gave the same bits on this machine (AMD, AVX-512, 1 MB L2) and on an emulated
  Intel Haswell and AMD Rome (``qemu-x86_64 -cpu``, other cache sizes). NNPACK, which torch may
  pick for some convolutions, is switched off in the process (``torch.backends.nnpack``).
- MKL's vector math computes ``torch.sqrt`` (and so the unfused Adam step) with different bits
  on different CPUs whatever ``MKL_CBWR`` says; the training loop uses the fused Adam kernel
  (ATen's own, pinned above) and the library takes no elementwise ``sqrt`` of tensors.
- Threads: OpenMP and MKL get a fixed count (2, this project's machines), so parallel
  reductions split their work the same way; ``OMP_DYNAMIC=FALSE``.

The environment variables are read when the libraries load, so they must be set before the
process starts: :func:`pinned_environ` gives a child process's environment (the pipeline's
runner, ``pipelines.refresh`` and the notebook tests use it). In that process, importing
``deqlib`` applies the in-process switches (:func:`apply_pinned`), because ``DEQLIB_NUMERICS``
is ``pinned`` there. :func:`describe` says which path the running process is on.

What it cannot pin: a CPU without AVX2 (ATen then falls back to its ``default`` kernels), another
architecture (ARM), a GPU, and other builds of torch or MKL. There the committed notebook outputs
are compared at a tolerance instead (``python -m pipelines.nbcheck --rtol``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["NUMERICS_ENV", "PINNED_ENV", "PINNED_THREADS", "pinned_environ", "apply_pinned",
           "is_pinned_requested", "describe"]

NUMERICS_ENV = "DEQLIB_NUMERICS"
PINNED_THREADS = 2
PINNED_ENV: dict[str, str] = {
    NUMERICS_ENV: "pinned",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": str(PINNED_THREADS),
    "MKL_NUM_THREADS": str(PINNED_THREADS),
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}


def pinned_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the pinned settings put over it:
    the environment to start a process on the pinned path with."""
    env = dict(os.environ if base is None else base)
    env.update(PINNED_ENV)
    return env


def is_pinned_requested(environ: Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(NUMERICS_ENV, "") == "pinned"


def apply_pinned() -> None:
    """The in-process part of the pinned path: no NNPACK convolutions, and the pinned thread
    count. Call it before any computation (``import deqlib`` does, when the process was
    started with :func:`pinned_environ`)."""
    import torch

    torch.backends.nnpack.set_flags(False)
    if torch.get_num_threads() != PINNED_THREADS:
        torch.set_num_threads(PINNED_THREADS)


def describe() -> dict[str, object]:
    """Which numeric path this process is on: whether every pinned setting holds, and what
    the libraries report. ``pinned`` is False when any setting is missing or the CPU could not
    honour it (no AVX2: ATen reports another capability)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    env_ok = all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
    return {
        "pinned": bool(env_ok and capability == "AVX2" and not torch._C._get_nnpack_enabled()
                       and torch.get_num_threads() == PINNED_THREADS),
        "aten_capability": capability,
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "nnpack": bool(torch._C._get_nnpack_enabled()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
