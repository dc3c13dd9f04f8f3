"""The solver comparison's configuration: the experiment (params.yaml's ``solvers`` section)
and the sizes of its four kinds of problem.

A problem is named by its kind (:data:`KINDS`) and, for the variant whose scale is calibrated
to the slower ``hard_nfe`` target, ``_hard`` (:data:`PROBLEMS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...checks import check_choice_list, check_int, check_int_list, check_real, check_real_list, check_str
from ...models.mdeq import MDEQConfig
from ...models.transformer import TransformerConfig
from ..wikitext.config import ARMS, WikiTextExperiment

__all__ = ["METHODS", "LIBRARIES", "KINDS", "PROBLEMS", "SyntheticSpec", "ConvSpec", "MDEQSpec",
           "TransformerSpec", "SolversExperiment"]

METHODS = ("fixed_point", "anderson", "broyden")
LIBRARIES = ("deqlib", "torchdeq")
KINDS = ("synthetic", "conv", "mdeq", "transformer")
PROBLEMS: tuple[str, ...] = tuple(n for k in KINDS for n in (k, f"{k}_hard"))


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
    """An MDEQ-sized residual branch (:class:`.problems.ConvMap`) at CIFAR resolution."""

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
    ``trained``: the headline experiment's arms (notebook 02's, trained briefly; see
    :mod:`.trained`): an arm without and one with the Jacobian penalty, every seed of
    ``trained.seeds``. ``backward_tols``: the tolerances its implicit backward is solved to
    (Table 4's 1e-4 and the released code's 1e-3), each judged by the gradient's error.
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
    trained: WikiTextExperiment = field(
        default_factory=lambda: WikiTextExperiment(arms=("post_ln", "post_ln_jr")))
    backward_tols: tuple[float, ...] = (1e-3, 1e-4)

    def __post_init__(self) -> None:
        arms = self.trained.arms
        if any(ARMS[a].explicit for a in arms) or not any(ARMS[a].jr for a in arms) \
                or all(ARMS[a].jr for a in arms):
            raise ValueError(f"trained.arms must be DEQ arms, at least one without JR and one with it, "
                             f"got trained.arms={list(arms)!r}")
        if len(self.trained.seeds) < 2:  # a paired test over seeds needs two at least
            raise ValueError(f"trained.seeds must list at least 2 seeds, "
                             f"got trained.seeds={list(self.trained.seeds)!r}")
        check_real_list("backward_tols", self.backward_tols, minimum=0, maximum=1)
        if any(t in (0, 1) for t in self.backward_tols):
            raise ValueError(f"backward_tols must be tolerances in (0, 1), "
                             f"got backward_tols={list(self.backward_tols)!r}")
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
