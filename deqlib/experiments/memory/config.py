"""Notebook 05's configuration (params.yaml's ``memory`` section): the two models' sizes, their
solvers and penalty (Table 4), and the grids of effective depth, NFE and repeats.

Nothing here is trained: weights and inputs are seeded random draws, since neither the memory
of a step nor its time depends on their values, only on shapes and on the calls made. Every
solve runs exactly the NFE asked for: the tolerances are set out of reach (a model in training
at its threshold spends all of it, as the unregularized Post-LN DEQ does in notebook 02).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...checks import check_choice_list, check_int, check_int_list, check_real
from ...deq import SolverSettings
from ...jacobian import JacobianPenalty
from ...models.mdeq import MDEQConfig
from ...models.transformer import TransformerConfig

__all__ = ["MODELS", "MODES", "EXPLICIT", "TransformerSpec", "MDEQSpec", "MemoryEval", "MemoryExperiment"]

MODELS = ("transformer", "mdeq")
# How a step is differentiated: the DEQ's three backward modes (deqlib.deq), and the explicit
# stacks of `depth` layers, weight-tied (one layer applied `depth` times) or untied.
MODES = ("implicit", "phantom", "unrolled")
EXPLICIT = ("tied", "untied")


def _check_solvers(forward: SolverSettings, backward: SolverSettings, jacobian: JacobianPenalty) -> None:
    for name, s in (("forward", forward), ("backward", backward)):
        if not isinstance(s, SolverSettings):
            raise ValueError(f"{name} must be a solver section (method, max_iter, tol), got {name}={s!r}")
    if not isinstance(jacobian, JacobianPenalty):
        raise ValueError(f"jacobian must be a penalty section (gamma, p, n_probes), got jacobian={jacobian!r}")
    if not jacobian.enabled:
        raise ValueError(f"jacobian must have gamma > 0 and p > 0 (the penalty is measured), got "
                         f"jacobian.gamma={jacobian.gamma!r}, jacobian.p={jacobian.p!r}")


@dataclass(frozen=True)
class TransformerSpec:
    """The DEQ-Transformer language model of Table 1 / Table 5 (params.yaml's ``wikitext``
    layer sizes) at the memory batch, on seeded tokens with a full memory of ``mem_len`` past
    positions. ``forward`` / ``backward``: the solvers (their ``max_iter`` is Table 4's
    threshold, used where the NFE is not the swept quantity); ``jacobian``: gamma at its start
    value, p and M of Table 4; ``depth``: the explicit stack of the time comparison
    (Transformer-XL's 18 layers); ``time_nfe``: the NFE of the timed DEQ steps."""

    batch: int = 15
    d_model: int = 64
    n_head: int = 4
    d_head: int = 16
    d_inner: int = 256
    tgt_len: int = 32
    mem_len: int = 32
    vocab: int = 5000
    cutoffs: tuple[int, ...] = (1000, 4000)
    div_val: float = 4.0
    dropout: float = 0.06
    init_std: float = 0.01
    forward: SolverSettings = field(default_factory=lambda: SolverSettings("anderson", 12, 1e-12))
    backward: SolverSettings = field(default_factory=lambda: SolverSettings("broyden", 12, 1e-12))
    jacobian: JacobianPenalty = field(default_factory=lambda: JacobianPenalty(gamma=1.6, p=0.35))
    depth: int = 18
    time_nfe: tuple[int, ...] = (4, 8, 13, 20, 30)

    def __post_init__(self) -> None:
        check_int("batch", self.batch, 1)
        check_int("vocab", self.vocab, 2)
        check_int("depth", self.depth, 1)
        check_int_list("time_nfe", self.time_nfe, 1, increasing=True)
        check_int_list("cutoffs", self.cutoffs, 1, increasing=True)  # before config() takes it apart
        _check_solvers(self.forward, self.backward, self.jacobian)
        self.config().check_vocab(self.vocab)  # TransformerConfig names any bad size

    def config(self, pre_ln: bool = False) -> TransformerConfig:
        return TransformerConfig(d_model=self.d_model, n_head=self.n_head, d_head=self.d_head, d_inner=self.d_inner,
                                 tgt_len=self.tgt_len, mem_len=self.mem_len, dropout=self.dropout, pre_ln=pre_ln,
                                 cutoffs=tuple(self.cutoffs), div_val=self.div_val, n_layer=self.depth,
                                 init_std=self.init_std)


@dataclass(frozen=True)
class MDEQSpec:
    """The CIFAR-10 MDEQ (params.yaml's ``cifar10`` model of the same profile) on ``batch``
    seeded images. ``forward`` / ``backward``, ``jacobian``, ``depth`` and ``time_nfe`` as for
    :class:`TransformerSpec` (``depth``: the explicit stack the step times are set against;
    the paper gives the MDEQ no time or memory figure to compare with)."""

    batch: int = 8
    channels: tuple[int, ...] = (16, 32, 64)
    expansion: int = 5
    groups: int = 4
    dropout: float = 0.25
    downsample: int = 1
    head_channels: tuple[int, ...] = (32, 64, 128)
    final_channels: int = 256
    image_size: int = 32
    init_std: float | None = None
    forward: SolverSettings = field(default_factory=lambda: SolverSettings("anderson", 7, 1e-12))
    backward: SolverSettings = field(default_factory=lambda: SolverSettings("anderson", 8, 1e-12))
    jacobian: JacobianPenalty = field(default_factory=lambda: JacobianPenalty(gamma=0.5, p=0.05))
    depth: int = 7
    time_nfe: tuple[int, ...] = (4, 7, 12, 20, 30)

    def __post_init__(self) -> None:
        check_int("batch", self.batch, 1)
        check_int("depth", self.depth, 1)
        check_int_list("channels", self.channels, 1)  # before config() takes them apart
        check_int_list("head_channels", self.head_channels, 1)
        check_int_list("time_nfe", self.time_nfe, 1, increasing=True)
        _check_solvers(self.forward, self.backward, self.jacobian)
        self.config()  # MDEQConfig names any bad width, group count or size

    def config(self) -> MDEQConfig:
        return MDEQConfig(channels=tuple(self.channels), expansion=self.expansion, groups=self.groups,
                          dropout=self.dropout, downsample=self.downsample, head_channels=tuple(self.head_channels),
                          final_channels=self.final_channels, image_size=self.image_size, init_std=self.init_std)


@dataclass(frozen=True)
class MemoryEval:
    """The grids. ``nfe``: forward NFE of the DEQ memory sweep (one line per ``modes`` entry);
    ``depths``: the explicit stacks' depths (weight-tied and untied); ``repeats``: timed steps
    per configuration (after one warm-up each; every configuration is timed once per round, the
    rounds interleaved, so that a slow spell of a shared machine falls on all of them);
    ``phantom_steps``: the phantom gradient's unrolled steps."""

    nfe: tuple[int, ...] = (4, 8, 16, 24, 32)
    depths: tuple[int, ...] = (2, 6, 10, 14, 18)
    modes: tuple[str, ...] = MODES
    repeats: int = 5
    phantom_steps: int = 5
    flat_tolerance: float = 0.05

    def __post_init__(self) -> None:
        check_int_list("nfe", self.nfe, 1, increasing=True)
        check_int_list("depths", self.depths, 1, increasing=True)
        check_choice_list("modes", self.modes, MODES, distinct=True)
        check_int("repeats", self.repeats, 2)  # a spread needs two
        check_int("phantom_steps", self.phantom_steps, 1)
        check_real("flat_tolerance", self.flat_tolerance, minimum=0, maximum=1, min_open=True)
        if len(self.nfe) < 2 or len(self.depths) < 2:
            raise ValueError(f"nfe and depths need two values each (a line), got nfe={list(self.nfe)}, "
                             f"depths={list(self.depths)}")


@dataclass(frozen=True)
class MemoryExperiment:
    """params.yaml's ``memory`` section. ``models``: the arms (each measured whole: its memory
    sweeps, Table 5's rows, the timings); ``seed``: the weights and inputs (one: the figures do
    not depend on the draw); ``device``: ``cpu``, ``cuda`` or ``auto`` (CUDA when there is one)."""

    models: tuple[str, ...] = MODELS
    transformer: TransformerSpec = field(default_factory=TransformerSpec)
    mdeq: MDEQSpec = field(default_factory=MDEQSpec)
    eval: MemoryEval = field(default_factory=MemoryEval)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_choice_list("models", self.models, MODELS, distinct=True)
        check_int("seed", self.seed, 0)
        if self.device not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got device={self.device!r}")
