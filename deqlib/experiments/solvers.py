"""Solver comparison (issue #6): deqlib's fixed-point, Anderson and Broyden against torchdeq's.

Two questions a user choosing a DEQ library asks: which solver on which problem, and what the
machinery costs beyond evaluating ``f``. Per problem, library and method this measures, for the
forward solve and for the implicit backward solve ``u = u J_f(z*) + dL/dz*``:

- NFE (calls of the map, counted by wrapping it, the same way for both libraries);
- converged or not, and the final relative residual ``max_b ||f(z)-z|| / ||f(z)||`` of the
  answer the solver returns, recomputed with one extra call;
- time to tolerance (median of ``repeats`` solves), the overhead ratio
  ``solve time / (NFE x time of one call)`` and the extra memory (peak live bytes of the solve
  minus those of one call, :class:`deqlib.measure.PeakMemory`);
- the error of the parameter gradient against a reference from a long float64 solve.

Problems are seeded builders (:data:`PROBLEMS`); each gives a batched map on flat states
``(B, D)``, a start point and ``dL/dz*`` of the loss ``L = <w, z*>``. Every kind has a harder
variant, the same map moved along a one-parameter family so that plain iteration contracts
slowly (spectral radius near 1): a scale of its residual branch (synthetic, conv) or, for the
real MDEQ and DEQ-Transformer maps, a point on the path between the map as initialized and a
Jacobian-regularized copy of it (:func:`contraction_path`).

torchdeq is optional (the ``bench`` extra); without it only deqlib's rows are made.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..bench import calibrate_scale, calibrated_conv_map
from ..checks import check_choice_list, check_int, check_int_list, check_real, check_str
from ..deq import StatePacker
from ..jacobian import frobenius_sq_per_dim, spectral_radius
from ..measure import PeakMemory, median_time
from ..models.mdeq import MDEQConfig, MultiscaleMap, Stem
from ..models.synthetic import SyntheticMap, SyntheticModelConfig
from ..models.transformer import Context, DEQTransformerLM, Memory, TransformerConfig
from ..nn import remove_weight_norm
from ..solvers import METHODS as DEQLIB_METHODS
from ..solvers import solve

__all__ = [
    "METHODS", "LIBRARIES", "PROBLEMS", "SyntheticSpec", "ConvSpec", "MDEQSpec", "TransformerSpec",
    "SolversExperiment", "Problem", "FlatMap", "LayerMap", "contraction_path", "build_problem",
    "torchdeq_version", "resolve_libraries", "library_solver",
    "CallRecorder", "measure_solve", "gradient_error", "reference", "describe_problem", "run_one",
    "compare", "Comparison",
    "time_ratios", "recommendations", "target_checks",
]

METHODS = ("fixed_point", "anderson", "broyden")
LIBRARIES = ("deqlib", "torchdeq")
# deqlib's method names -> torchdeq 0.1.0's registry keys (torchdeq.solver.get_solver).
_TORCHDEQ_KEYS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    """The synthetic experiment's map ``f(z; x) = W2^T ReLU(W1 z + U x + b)`` (scalar z, x)."""

    batch: int = 256
    hidden: int = 50

    def __post_init__(self) -> None:
        check_int("batch", self.batch, 1)
        check_int("hidden", self.hidden, 1)


@dataclass(frozen=True)
class ConvSpec:
    """An MDEQ-sized residual branch (:class:`deqlib.bench.ConvMap`) at CIFAR resolution."""

    batch: int = 8
    channels: int = 64
    size: int = 32
    groups: int = 8

    def __post_init__(self) -> None:
        for name in ("batch", "channels", "size", "groups"):
            check_int(name, getattr(self, name), 1)
        if self.channels % self.groups:
            raise ValueError(f"channels={self.channels} must be a multiple of groups={self.groups}")


@dataclass(frozen=True)
class MDEQSpec:
    """The MDEQ's map ``f`` (:class:`deqlib.models.mdeq.MultiscaleMap`) on seeded images.

    The widths follow params.yaml's ``cifar10`` model of the same profile. Dropout is off and the
    convolutions carry plain weights (no weight normalization: at initialization the same
    function, and inside one solve of training the weights are fixed either way).
    """

    batch: int = 4
    channels: tuple[int, ...] = (16, 32, 64)
    expansion: int = 5
    groups: int = 4
    downsample: int = 1
    image_size: int = 32

    def __post_init__(self) -> None:
        check_int("batch", self.batch, 1)
        check_int_list("channels", self.channels, 1)  # before config() takes it apart
        self.config()  # MDEQConfig names any bad width, group count or size

    def config(self) -> MDEQConfig:
        return MDEQConfig(channels=tuple(self.channels), expansion=self.expansion, groups=self.groups,
                          downsample=self.downsample, image_size=self.image_size, dropout=0.0,
                          head_channels=tuple(self.channels), final_channels=self.channels[-1],
                          weight_norm=False, init_std=None)


@dataclass(frozen=True)
class TransformerSpec:
    """One DEQ-Transformer layer (Post-LN, :class:`deqlib.models.transformer.TransformerLayer`)
    on a segment of seeded tokens with a full memory; dropout off, weight normalization folded in.
    """

    batch: int = 4
    d_model: int = 64
    n_head: int = 4
    d_head: int = 16
    d_inner: int = 256
    tgt_len: int = 32
    mem_len: int = 32
    vocab: int = 1000

    def __post_init__(self) -> None:
        check_int("batch", self.batch, 1)
        check_int("vocab", self.vocab, 2)
        self.config()

    def config(self) -> TransformerConfig:
        return TransformerConfig(d_model=self.d_model, n_head=self.n_head, d_head=self.d_head,
                                 d_inner=self.d_inner, tgt_len=self.tgt_len, mem_len=self.mem_len,
                                 dropout=0.0, cutoffs=(self.vocab // 2,), div_val=1.0)


@dataclass(frozen=True)
class SolversExperiment:
    """Everything the comparison needs; built from params.yaml's ``solvers`` section.

    ``easy_nfe`` / ``hard_nfe``: the plain-iteration call counts (to ``tol``) at which each
    problem's scale is calibrated, for the plain and the ``_hard`` variant.
    ``contract_steps`` / ``contract_lr``: the Adam steps on the Jacobian penalty that make the
    contractive end of the MDEQ's and the Transformer's path (:func:`contraction_path`).
    ``device``: ``"cpu"``, ``"cuda"`` (``"cuda:N"``) or ``"auto"`` (CUDA when there is one).
    """

    problems: tuple[str, ...] = ("synthetic", "synthetic_hard", "conv", "conv_hard", "mdeq", "mdeq_hard",
                                 "transformer", "transformer_hard")
    methods: tuple[str, ...] = METHODS
    libraries: tuple[str, ...] = LIBRARIES
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    conv: ConvSpec = field(default_factory=ConvSpec)
    mdeq: MDEQSpec = field(default_factory=MDEQSpec)
    transformer: TransformerSpec = field(default_factory=TransformerSpec)
    contract_steps: int = 40
    contract_lr: float = 0.01
    device: str = "cpu"
    tol: float = 1e-3
    backward_tol: float = 1e-3
    max_iter: int = 200
    easy_nfe: tuple[int, ...] = (20, 40)
    hard_nfe: tuple[int, ...] = (100, 150)
    repeats: int = 3
    reference_tol: float = 1e-8
    reference_max_iter: int = 2000
    radius_iters: int = 150
    seed: int = 0

    def __post_init__(self) -> None:
        for name, known in (("problems", PROBLEMS), ("methods", METHODS), ("libraries", LIBRARIES)):
            check_choice_list(name, getattr(self, name), known)
        for name in ("tol", "backward_tol", "reference_tol"):
            check_real(name, getattr(self, name), minimum=0, maximum=1, min_open=True, max_open=True)
        for name in ("max_iter", "repeats", "reference_max_iter", "radius_iters", "contract_steps"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        for name in ("easy_nfe", "hard_nfe"):  # (lo, hi) calls of plain iteration
            check_int_list(name, getattr(self, name), 1, length=2, nondecreasing=True)
        check_real("contract_lr", self.contract_lr, minimum=0, min_open=True)
        check_str("device", self.device)
        self.torch_device()  # a bad or unavailable device fails here, before any compute

    def torch_device(self) -> torch.device:
        """The device the problems run on (``"auto"``: CUDA when available, else CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got device={self.device!r}") from err
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got device={self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA device here; use 'cpu' or 'auto'")
        return dev


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


class FlatMap(nn.Module):
    """``f`` on flat states: ``(B, D) -> (B, D)``, the input ``x`` held as a buffer.

    ``inner`` is called as ``inner(state)`` when ``x`` is None, else ``inner(state, x)``;
    ``state`` is a tensor or a list of tensors shaped like ``example`` (one per scale).
    """

    def __init__(self, inner: nn.Module, example: Tensor | Sequence[Tensor], x: Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.packer = StatePacker(example)
        self.register_buffer("x", x)

    def forward(self, z: Tensor) -> Tensor:
        state = self.packer.unpack(z)
        out = self.inner(state) if self.x is None else self.inner(state, self.x)
        return self.packer.pack(out)


@dataclass
class Problem:
    """A seeded fixed-point problem ``z = f(z)`` on a batch, with what the gradient needs.

    Attributes:
        name: registry name. description: one line for tables.
        f: ``(B, D) -> (B, D)`` module, samples independent; its parameters are what the
            gradient is taken with respect to.
        z0: ``(B, D)`` start point. grad_out: ``(B, D)`` ``dL/dz*`` of ``L = <grad_out, z*>``.
        scale: the calibrated contraction knob (what makes the ``_hard`` variant hard).
    """

    name: str
    description: str
    f: nn.Module
    z0: Tensor
    grad_out: Tensor
    scale: float

    def params(self) -> list[Tensor]:
        return [p for p in self.f.parameters() if p.requires_grad]

    def to(self, target: torch.dtype | torch.device) -> "Problem":
        """A copy in ``target``, a dtype (same numbers, e.g. float64 for a reference solve) or
        a device."""
        return Problem(self.name, self.description, copy.deepcopy(self.f).to(target),
                       self.z0.to(target), self.grad_out.to(target), self.scale)


def _grad_out(shape: torch.Size, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(shape, generator=g) / math.sqrt(shape[0])


def _synthetic(exp: SolversExperiment, target: tuple[int, int], name: str) -> Problem:
    """The synthetic map with seeded N(0, 1) weights, ``W2 = s |N(0, 1)| / hidden`` (positive,
    so ``f >= 0`` and ``z*`` stays off 0, where the per-sample relative residual is ill-posed),
    ``x ~ U(-2, 2)``; ``s`` calibrated to ``target``."""
    spec = exp.synthetic
    g = torch.Generator().manual_seed(exp.seed)
    with torch.random.fork_rng():  # the module's own init draws from the global RNG
        inner = SyntheticMap(SyntheticModelConfig(hidden=spec.hidden))
    h = spec.hidden
    w2 = torch.randn(h, 1, generator=g).abs() / h
    with torch.no_grad():
        inner.W1.copy_(torch.randn(h, 1, generator=g))
        inner.U.copy_(torch.randn(h, 1, generator=g))
        inner.b.copy_(torch.randn(h, generator=g))
    x = torch.rand(spec.batch, 1, generator=g) * 4 - 2
    f = FlatMap(inner, torch.zeros(spec.batch, 1), x)
    z0 = torch.zeros(spec.batch, 1)

    def set_scale(s: float) -> FlatMap:
        with torch.no_grad():
            inner.W2.copy_(w2 * s)
        return f

    scale = calibrate_scale(set_scale, z0, exp.tol, target)
    set_scale(scale)
    desc = f"synthetic 2-layer ReLU, hidden {h}, batch {spec.batch}, D=1"
    return Problem(name, desc, f, z0, _grad_out(z0.shape, exp.seed), scale)


def _conv(exp: SolversExperiment, target: tuple[int, int], name: str) -> Problem:
    """deqlib.bench's calibrated ConvMap (GroupNorm(s conv(relu(conv z)) + x)) at CIFAR size."""
    spec = exp.conv
    with torch.random.fork_rng():  # calibrated_conv_map seeds the global RNG
        inner = calibrated_conv_map(spec.batch, spec.channels, spec.size, exp.tol, exp.seed, tuple(target))
    shape = (spec.batch, spec.channels, spec.size, spec.size)
    f = FlatMap(inner, torch.zeros(shape))
    z0 = torch.zeros(spec.batch, spec.channels * spec.size**2)
    desc = f"conv residual branch + GN, {spec.channels} ch {spec.size}x{spec.size}, batch {spec.batch}"
    return Problem(name, desc, f, z0, _grad_out(z0.shape, exp.seed), float(inner.scale))


def contraction_path(f: nn.Module, z0: Tensor, steps: int, lr: float, seed: int) -> Callable[[float], nn.Module]:
    """A one-parameter family of maps from a Jacobian-regularized copy of ``f`` (``t = 0``) to
    ``f`` as it is (``t = 1``); returns ``at(t)``, which sets ``f``'s parameters to
    ``theta_reg + t (theta_init - theta_reg)`` and returns ``f``.

    Why: the MDEQ and DEQ-Transformer maps are normalized (GroupNorm, LayerNorm), so scaling a
    branch does not change how fast they contract, and at initialization plain iteration does
    not reach 1e-3 in 300 calls (MDEQ: residual stuck near 0.8; Transformer: near 4e-3). What
    makes trained DEQs contractive is training, with the Jacobian penalty the paper's lever.
    ``theta_reg`` is ``steps`` Adam steps (rate ``lr``) on that penalty alone,
    ``||J_f(z)||_F^2 / d`` (one seeded probe), at the states plain iteration visits (three
    calls between steps); no task loss is involved.

    Args:
        f: ``(B, D) -> (B, D)`` module; its trainable parameters are moved.
        z0: ``(B, D)`` start of the walk.
    """
    params = [p for p in f.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device=z0.device).manual_seed(seed)
    z = z0
    for _ in range(steps):
        with torch.no_grad():
            for _ in range(3):
                z = f(z)
        zz = z.detach().requires_grad_()
        penalty = frobenius_sq_per_dim(zz, f(zz), 1, create_graph=True, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        penalty.backward()
        opt.step()
    end = [p.detach().clone() for p in params]

    def at(t: float) -> nn.Module:
        with torch.no_grad():
            for p, reg, init in zip(params, end, start):
                p.copy_(torch.lerp(reg, init, float(t)))
        return f

    return at


def _on_path(exp: SolversExperiment, target: tuple[int, int], name: str, f: nn.Module, z0: Tensor,
             description: str) -> Problem:
    """Calibrate ``t`` on :func:`contraction_path` so plain iteration needs ``target`` calls."""
    at = contraction_path(f, z0, exp.contract_steps, exp.contract_lr, exp.seed)
    t = calibrate_scale(at, z0, exp.tol, target, hi=1.0)
    at(t)
    return Problem(name, description, f, z0, _grad_out(z0.shape, exp.seed).to(z0.device), t)


def _mdeq(exp: SolversExperiment, target: tuple[int, int], name: str) -> Problem:
    """The MDEQ's multiscale map on seeded N(0, 1) images (their stem's output is the injection)."""
    spec, dev = exp.mdeq, exp.torch_device()
    cfg = spec.config()
    with torch.random.fork_rng(devices=[]):  # module initialization draws from the global RNG
        torch.manual_seed(exp.seed)
        inner, stem = MultiscaleMap(cfg), Stem(cfg)
    g = torch.Generator().manual_seed(exp.seed)
    images = torch.randn(spec.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    with torch.no_grad():
        x = stem(images)
    example = [torch.zeros(spec.batch, c, s, s) for c, s in zip(cfg.channels, cfg.sizes)]
    f = FlatMap(inner.eval(), example, x).to(dev)
    z0 = f.packer.pack(example).to(dev)
    sizes = "/".join(f"{c}@{s}x{s}" for c, s in zip(cfg.channels, cfg.sizes))
    desc = f"MDEQ map, scales {sizes}, batch {spec.batch}"
    return _on_path(exp, target, name, f, z0, desc)


class LayerMap(nn.Module):
    """A Transformer layer as a map of its state alone, ``z (B, L, d) -> (B, L, d)``; the
    segment's context (injections, memory, positions, mask) is held in buffers, so ``.to()``
    moves and converts it with the layer."""

    def __init__(self, layer: nn.Module, ctx: Context):
        super().__init__()
        self.layer = layer
        for key, value in ctx._asdict().items():
            self.register_buffer(key, value)

    def forward(self, z: Tensor) -> Tensor:
        return self.layer(z, Context(self.u, self.mem, self.pos, self.dist, self.mask))


def _transformer(exp: SolversExperiment, target: tuple[int, int], name: str) -> Problem:
    """A Post-LN DEQ-Transformer layer on a segment of seeded tokens after a full memory
    (memory states N(0, 1), the scale of layer-normalized equilibria)."""
    spec, dev = exp.transformer, exp.torch_device()
    cfg = spec.config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(exp.seed)
        lm = DEQTransformerLM(cfg, spec.vocab).eval()
    B, L, M, d = spec.batch, cfg.tgt_len, cfg.mem_len, cfg.d_model
    g = torch.Generator().manual_seed(exp.seed)
    tokens = torch.randint(0, spec.vocab, (B, M + L), generator=g)
    with torch.no_grad():
        u = lm.inject(lm.embed(tokens))
        ctx = lm.context(u[:, M:], Memory(torch.randn(B, M, d, generator=g), u[:, :M]))
    for module in lm.layer.modules():  # fold g * v / ||v|| into plain weights, as once_per_step would
        if "weight_g" in module._parameters:
            remove_weight_norm(module)
    f = FlatMap(LayerMap(lm.layer, ctx), torch.zeros(B, L, d)).to(dev)
    z0 = torch.zeros(B, L * d, device=dev)
    desc = f"Post-LN Transformer layer, d {d}, {cfg.n_head} heads, inner {cfg.d_inner}, L {L} + mem {M}, batch {B}"
    return _on_path(exp, target, name, f, z0, desc)


# name -> builder(exp, calibration target, name); "_hard" variants use exp.hard_nfe.
_KINDS: dict[str, Callable[[SolversExperiment, tuple[int, int], str], Problem]] = {
    "synthetic": _synthetic,
    "conv": _conv,
    "mdeq": _mdeq,
    "transformer": _transformer,
}
PROBLEMS: tuple[str, ...] = tuple(n for k in _KINDS for n in (k, f"{k}_hard"))


def build_problem(name: str, exp: SolversExperiment) -> Problem:
    """The problem ``name`` (see :data:`PROBLEMS`), built deterministically from ``exp.seed``,
    on ``exp``'s device."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {list(PROBLEMS)}")
    kind, hard = (name[:-5], True) if name.endswith("_hard") else (name, False)
    target = tuple(exp.hard_nfe if hard else exp.easy_nfe)
    problem = _KINDS[kind](exp, target, name)
    dev, at = exp.torch_device(), problem.z0.device
    same = at.type == dev.type and (dev.index is None or at.index == dev.index)
    return problem if same else problem.to(dev)


# ---------------------------------------------------------------------------------------------
# Libraries
# ---------------------------------------------------------------------------------------------

Solver = Callable[[Callable[[Tensor], Tensor], Tensor, str, int, float], Tensor]


def torchdeq_version() -> str | None:
    """torchdeq's installed version, or None when it cannot be imported."""
    try:
        importlib.import_module("torchdeq.solver")
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchdeq")
    except PackageNotFoundError:
        return "unknown"


def resolve_libraries(requested: Sequence[str]) -> tuple[list[str], str]:
    """The requested libraries that can run here, and a line saying what is compared."""
    bad = [lib for lib in requested if lib not in LIBRARIES]
    if bad:
        raise ValueError(f"unknown libraries {bad}; choose from {list(LIBRARIES)}")
    libs = list(requested)
    if "torchdeq" in libs:
        ver = torchdeq_version()
        if ver is None:
            libs.remove("torchdeq")
            return libs, ("torchdeq is not installed (pip install 'deqlib[bench]'): "
                          "deqlib's rows only, no comparison")
        return libs, f"comparing deqlib with torchdeq {ver}"
    return libs, "deqlib only (torchdeq not requested)"


def _deqlib_solver(f: Callable[[Tensor], Tensor], z0: Tensor, method: str, max_iter: int,
                   tol: float) -> Tensor:
    # Default options: Anderson m=5, beta=1, lam=1e-4 relative to the Gram diagonal;
    # Broyden window=20.
    return solve(f, z0, method=method, max_iter=max_iter, tol=tol, stop_mode="rel").z


def _torchdeq_solver(f: Callable[[Tensor], Tensor], z0: Tensor, method: str, max_iter: int,
                     tol: float) -> Tensor:
    # Only max_iter, tol and stop_mode="rel" are set; the rest are torchdeq 0.1.0's defaults:
    # Anderson m=6, lam=1e-4 (absolute), tau=1; Broyden LBFGS_thres=None (a history of
    # max_iter terms, preallocated), ls=False; fixed_point_iter tau=1. All return the lowest-
    # residual estimate (return_final=False).
    from torchdeq.solver import get_solver

    z, _, _ = get_solver(_TORCHDEQ_KEYS[method])(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel")
    return z


def library_solver(library: str, method: str) -> Solver:
    """``solver(f, z0, method, max_iter, tol) -> answer`` for one library (no autograd)."""
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; choose from {list(LIBRARIES)}")
    if method not in METHODS or method not in DEQLIB_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if library == "torchdeq" and torchdeq_version() is None:
        raise ValueError("library 'torchdeq' is not installed (pip install 'deqlib[bench]')")
    return _deqlib_solver if library == "deqlib" else _torchdeq_solver


# ---------------------------------------------------------------------------------------------
# Measuring one solve
# ---------------------------------------------------------------------------------------------


def _max_rel_residual(z: Tensor, fz: Tensor) -> float:
    d = (fz - z).flatten(1).norm(dim=1)
    return float((d / (fz.flatten(1).norm(dim=1) + 1e-12)).max())


class CallRecorder:
    """Wraps a map: counts its calls and, with ``record=True``, logs after each call the
    batch-max relative residual and the time since :meth:`start`, net of its own bookkeeping.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], record: bool = False):
        self.f = f
        self.record = record
        self.calls = 0
        self.trace: list[tuple[int, float, float]] = []  # (call, seconds, max rel residual)
        self._t0 = time.perf_counter()
        self._paused = 0.0

    def start(self) -> None:
        self._t0, self._paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        """Seconds since :meth:`start`, net of the recorder's own bookkeeping."""
        return time.perf_counter() - self._t0 - self._paused

    def __call__(self, z: Tensor) -> Tensor:
        out = self.f(z)
        self.calls += 1
        if self.record:
            if out.is_cuda:  # the call's kernels finish inside the timed span, not the paused one
                torch.cuda.synchronize(out.device)
            t = time.perf_counter()
            res = _max_rel_residual(z, out)
            self.trace.append((self.calls, t - self._t0 - self._paused, res))
            self._paused += time.perf_counter() - t
        return out


def _call_time(fn: Callable[[], object], repeats: int, min_s: float = 0.02) -> float:
    """Median seconds of one ``fn()``, timing loops of several calls when one is tiny."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    n = max(1, int(min_s / max(one, 1e-7)))

    def loop() -> None:
        for _ in range(n):
            fn()

    return median_time(loop, repeats=max(5, repeats), warmup=1) / n


@dataclass
class Measurement:
    """One solve of one library and method (forward or backward); times in seconds."""

    nfe: int
    converged: bool
    residual: float
    time_s: float
    overhead: float
    extra_mem_mb: float
    trace: list[tuple[int, float, float]]
    answer: Tensor


@torch.no_grad()
def measure_solve(solver: Solver, f: Callable[[Tensor], Tensor], z0: Tensor, method: str,
                  max_iter: int, tol: float, repeats: int, call_s: float, call_peak: int) -> Measurement:
    """Record, time and measure the memory of ``solver`` on ``f`` from ``z0``.

    ``call_s`` and ``call_peak`` are the time and peak bytes of one call of ``f`` (the
    overhead ratio's and the extra memory's baselines).
    """
    rec = CallRecorder(f, record=True)
    rec.start()
    answer = solver(rec, z0, method, max_iter, tol)
    recorded_s = rec.elapsed()
    fa = f(answer)
    residual = _max_rel_residual(answer, fa)
    # The recorded run is the first of the ``repeats`` timed ones (its bookkeeping excluded).
    times = [recorded_s] + [median_time(lambda: solver(f, z0, method, max_iter, tol), repeats=1,
                                        warmup=0) for _ in range(repeats - 1)]
    t = sorted(times)[len(times) // 2]
    with PeakMemory() as pm:
        solver(f, z0, method, max_iter, tol)
    return Measurement(
        nfe=rec.calls, converged=bool(residual < tol), residual=residual, time_s=t,
        overhead=t / (rec.calls * call_s), extra_mem_mb=(pm.peak - call_peak) / 2**20,
        trace=rec.trace, answer=answer,
    )


def _peak_of(fn: Callable[[], object]) -> int:
    with PeakMemory() as pm:
        fn()
    return pm.peak


class _Backward:
    """The implicit backward at ``z*``: ``step(u) = u J_f(z*) + g`` and the parameter gradient
    ``u df/dtheta`` (``L = <g, z*>``, so ``dL/dtheta`` solves ``u = u J + g``)."""

    def __init__(self, problem: Problem, z_star: Tensor):
        self.params = problem.params()
        self.g = problem.grad_out.to(z_star.dtype)
        self.z = z_star.detach().requires_grad_()
        with torch.enable_grad():
            self.fz = problem.f(self.z)

    def step(self, u: Tensor) -> Tensor:
        (uj,) = torch.autograd.grad(self.fz, self.z, u, retain_graph=True)
        return uj + self.g

    def param_grad(self, u: Tensor) -> Tensor:
        grads = torch.autograd.grad(self.fz, self.params, u, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])


def gradient_error(grad: Tensor, ref: Tensor) -> float:
    """Relative error ``||grad - ref|| / ||ref||`` (computed in float64)."""
    if grad.shape != ref.shape:
        raise ValueError(f"gradient shapes differ: {tuple(grad.shape)} vs reference {tuple(ref.shape)}")
    ref64 = ref.double()
    return float((grad.double() - ref64).norm() / ref64.norm().clamp_min(1e-300))


@dataclass
class Reference:
    """A long float64 solve: the fixed point, the gradient and how well both were solved."""

    z_star: Tensor
    grad: Tensor
    forward_residual: float
    backward_residual: float
    forward_nfe: int
    backward_nfe: int


def reference(problem: Problem, tol: float = 1e-8, max_iter: int = 2000) -> Reference:
    """Forward and backward solved in float64 with deqlib's Anderson to ``tol``."""
    p64 = problem.to(torch.float64)
    fwd = solve(p64.f, p64.z0, method="anderson", max_iter=max_iter, tol=tol)
    bw = _Backward(p64, fwd.z)
    with torch.no_grad():
        bwd = solve(bw.step, bw.g, method="anderson", max_iter=max_iter, tol=tol)
    return Reference(fwd.z, bw.param_grad(bwd.z), float(fwd.rel_residual.max()),
                     float(bwd.rel_residual.max()), fwd.nfe, bwd.nfe)


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """What :func:`compare` returns.

    ``problems``: one dict per problem (sizes, spectral radius, call costs, reference).
    ``rows``: one dict per (problem, library, method) with ``fwd_*`` and ``bwd_*`` columns and
    ``grad_error``. ``curves``: residual traces, one dict per call.
    """

    libraries: list[str]
    note: str
    problems: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)


def describe_problem(problem: Problem, exp: SolversExperiment) -> tuple[dict, Reference, dict]:
    """Reference solve, spectral radius at ``z*`` and the time/peak of one call of ``f`` and
    of one backward step. Returns (info row, reference, baselines)."""
    t0 = time.perf_counter()
    ref = reference(problem, exp.reference_tol, exp.reference_max_iter)
    t_ref = time.perf_counter() - t0
    z_star = ref.z_star.to(problem.z0.dtype)
    bw = _Backward(problem, z_star)
    gen = torch.Generator(device=bw.z.device).manual_seed(exp.seed + 2)
    rho = spectral_radius(bw.z, bw.fz, n_iter=exp.radius_iters, generator=gen)
    t_rho = time.perf_counter() - t0 - t_ref
    with torch.no_grad():
        f_s = _call_time(lambda: problem.f(z_star), exp.repeats)
        f_peak = _peak_of(lambda: problem.f(z_star))
        u = bw.g.clone()
        b_s = _call_time(lambda: bw.step(u), exp.repeats)
        b_peak = _peak_of(lambda: bw.step(u))
    B, D = problem.z0.shape
    info = {
        "problem": problem.name, "description": problem.description, "batch": B, "dim": D,
        "scale": problem.scale, "radius_max": float(rho.max()), "radius_mean": float(rho.mean()),
        "f_ms": f_s * 1e3, "vjp_step_ms": b_s * 1e3, "state_mb": problem.z0.numel() * 4 / 2**20,
        "ref_fwd_residual": ref.forward_residual, "ref_bwd_residual": ref.backward_residual,
        "ref_fwd_nfe": ref.forward_nfe, "ref_bwd_nfe": ref.backward_nfe,
        "reference_s": t_ref, "radius_s": t_rho,
    }
    return info, ref, {"f_s": f_s, "f_peak": f_peak, "b_s": b_s, "b_peak": b_peak}


def call_time_drift(problem: Problem, base: dict, z: Tensor, repeats: int) -> float:
    """Time of one call of ``f`` now over the one measured before the runs: far from 1 means
    something else shared the CPU while the runs were timed."""
    with torch.no_grad():
        return _call_time(lambda: problem.f(z), repeats) / base["f_s"]


def run_one(problem: Problem, library: str, method: str, exp: SolversExperiment, ref: Reference,
            base: dict) -> tuple[dict, list[dict]]:
    """Forward and backward of one library and method on one problem: (row, curve rows)."""
    solver = library_solver(library, method)
    fwd = measure_solve(solver, problem.f, problem.z0, method, exp.max_iter, exp.tol, exp.repeats,
                        base["f_s"], base["f_peak"])
    bw = _Backward(problem, fwd.answer)
    bwd = measure_solve(solver, bw.step, bw.g, method, exp.max_iter, exp.backward_tol, exp.repeats,
                        base["b_s"], base["b_peak"])
    grad = bw.param_grad(bwd.answer)
    row = {"problem": problem.name, "library": library, "method": method}
    for prefix, m in (("fwd", fwd), ("bwd", bwd)):
        row.update({f"{prefix}_nfe": m.nfe, f"{prefix}_converged": m.converged,
                    f"{prefix}_residual": m.residual, f"{prefix}_time_s": m.time_s,
                    f"{prefix}_overhead": m.overhead, f"{prefix}_extra_mem_mb": m.extra_mem_mb})
    row["grad_error"] = gradient_error(grad, ref.grad)
    curves = [{"problem": problem.name, "library": library, "method": method, "direction": d,
               "nfe": n, "time_s": t, "max_rel_residual": r}
              for d, m in (("forward", fwd), ("backward", bwd)) for n, t, r in m.trace]
    return row, curves


def compare(exp: SolversExperiment, log: Callable[[str], None] | None = None) -> Comparison:
    """Run every problem x library x method of ``exp``; ``log`` gets a line per step."""
    log = log or (lambda _msg: None)
    libs, note = resolve_libraries(exp.libraries)
    out = Comparison(libraries=libs, note=note)
    for name in exp.problems:
        t0 = time.perf_counter()
        problem = build_problem(name, exp)
        info, ref, base = describe_problem(problem, exp)
        out.problems.append(info)
        log(f"{name}: built and described in {time.perf_counter() - t0:.1f} s (reference "
            f"{info['reference_s']:.1f} s, spectral radius {info['radius_s']:.1f} s; one call "
            f"{info['f_ms']:.3f} ms, backward step {info['vjp_step_ms']:.3f} ms)")
        # Libraries alternate within each method, so that a disturbance of the machine during
        # the runs hits both sides of a ratio alike.
        for method in exp.methods:
            for library in libs:
                t0 = time.perf_counter()
                row, curves = run_one(problem, library, method, exp, ref, base)
                out.rows.append(row)
                out.curves.extend(curves)
                log(f"  {library:>8} {method:<11} fwd NFE {row['fwd_nfe']:>4} "
                    f"bwd NFE {row['bwd_nfe']:>4}  ({time.perf_counter() - t0:.1f} s)")
        info["f_time_drift"] = call_time_drift(problem, base, ref.z_star.to(problem.z0.dtype), exp.repeats)
        if abs(info["f_time_drift"] - 1) > 0.25:
            log(f"  WARNING: one call of f now takes {info['f_time_drift']:.2f}x its time before the "
                "runs: the machine was shared, timings of this problem are unreliable")
    out.rows.sort(key=lambda r: (exp.problems.index(r["problem"]), LIBRARIES.index(r["library"]),
                                 METHODS.index(r["method"])))
    return out


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


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


OVERHEAD_TARGETS = {"fixed_point": 1.15, "anderson": 1.15, "broyden": 1.30}
RATIO_TARGETS = {"fixed_point": 0.8, "anderson": 0.5, "broyden": 0.2}


def target_checks(comparison: Comparison, min_call_ms: float = 5.0) -> list[dict]:
    """The issue's targets for deqlib against this run: overhead where one call costs at
    least ``min_call_ms`` (else reported, exempt), converged wherever torchdeq converged, and
    the geometric-mean time ratios per method."""
    f_ms = {p["problem"]: p["f_ms"] for p in comparison.problems}
    b_ms = {p["problem"]: p["vjp_step_ms"] for p in comparison.problems}
    checks = []
    for r in comparison.rows:
        if r["library"] != "deqlib":
            continue
        for d, ms in (("fwd", f_ms), ("bwd", b_ms)):
            target = OVERHEAD_TARGETS[r["method"]]
            applies = ms[r["problem"]] >= min_call_ms
            checks.append({"target": f"{d} overhead <= {target}", "problem": r["problem"],
                           "method": r["method"], "value": round(r[f"{d}_overhead"], 2),
                           "met": (r[f"{d}_overhead"] <= target) if applies else "exempt (tiny f)"})
    by = {(r["problem"], r["library"], r["method"]): r for r in comparison.rows}
    for (problem, lib, method), r in by.items():
        ours = by.get((problem, "deqlib", method))
        if lib != "torchdeq" or ours is None:
            continue
        for d in ("fwd", "bwd"):
            if r[f"{d}_converged"]:
                checks.append({"target": f"{d} converges where torchdeq does", "problem": problem,
                               "method": method, "value": ours[f"{d}_converged"],
                               "met": bool(ours[f"{d}_converged"])})
    for method, v in time_ratios(comparison.rows).items():
        for which in ("all", "both_converged"):
            if v[which] is not None:
                checks.append({"target": f"geomean fwd time ratio <= {RATIO_TARGETS[method]}",
                               "problem": f"{which} ({v['n_' + which]})", "method": method,
                               "value": round(v[which], 3), "met": v[which] <= RATIO_TARGETS[method]})
    return checks
