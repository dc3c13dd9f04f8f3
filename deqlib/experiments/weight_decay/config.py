"""The weight-decay experiment's configuration (supplement B.2 / B.3, Figures 8 and 10): two
models, each with its data, model, training and measurement sections and its weight-decay doses
and adaptive-gamma policy, and the arms every model trains for every seed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from ...checks import check_choice_list, check_int, check_int_list, check_real, check_real_list
from ...data.cifar import CifarDataConfig
from ...data.wikitext import WikiTextData
from ...jacobian import JacobianPenalty
from ...models.mdeq import MDEQConfig
from ...models.transformer import TransformerConfig
from ...penalty_schedule import AdaptiveGamma
from ...train import TrainConfig

__all__ = ["ARMS", "MODELS", "Arm", "MonitorConfig", "TransformerPart", "MDEQPart", "WeightDecayExperiment",
           "arm_train_config", "arm_name", "split_arm"]


class Arm(NamedTuple):
    """What an arm changes in the training settings: the weight-decay dose (index into the
    model's ``weight_decay`` pair, or None for none) and the Jacobian penalty (off, the fixed
    gamma of ``train.jacobian``, or adaptive from there)."""

    dose: int | None
    jr: str  # "off", "fixed" or "adaptive"
    label: str


ARMS: dict[str, Arm] = {
    "none": Arm(None, "off", "no regularization"),
    "wd_low": Arm(0, "off", "weight decay, the lower dose"),
    "wd_high": Arm(1, "off", "weight decay, the higher dose"),
    "jr": Arm(None, "fixed", "JR at the paper's gamma"),
    "jr_adaptive": Arm(None, "adaptive", "JR with an adaptive gamma"),
}
MODELS = ("transformer", "mdeq")


@dataclass(frozen=True)
class MonitorConfig:
    """How a model is measured during and after training.

    Attributes:
        monitor_every: training steps between two measurements of ``||J_f||_F`` and the forward
            residual at the training threshold on the fixed batch (the loop's monitor; also
            after the last step).
        monitor_batch: examples of that fixed batch (images, or token streams).
        jac_probes: Hutchinson probes of ``||J_f||_F``.
        radius_iters, radius_vectors: the subspace iteration of the spectral radius (after
            training only: every ``monitor_every`` steps it would cost more than the training).
        tol: the relative residual plain iteration is counted to (NFE to tol), at most
            ``plain_nfe_cap`` calls.
        eval_batch: test images per solve, or token streams, for the task metric.
        max_eval: the leading test images / evaluation tokens used (None: all).
    """

    monitor_every: int = 50
    monitor_batch: int = 8
    jac_probes: int = 4
    radius_iters: int = 150
    radius_vectors: int = 8
    tol: float = 1e-3
    plain_nfe_cap: int = 100
    eval_batch: int = 100
    max_eval: int | None = None

    def __post_init__(self) -> None:
        for name in ("monitor_every", "monitor_batch", "jac_probes", "radius_iters", "radius_vectors",
                     "plain_nfe_cap", "eval_batch"):
            check_int(name, getattr(self, name), 1)
        check_int("max_eval", self.max_eval, 1, optional=True)
        check_real("tol", self.tol, minimum=0, maximum=1, min_open=True, max_open=True)


def _check_part(train: TrainConfig, weight_decay: tuple[float, ...], adaptive: AdaptiveGamma) -> None:
    """What both models' sections must satisfy, refused by name before any training."""
    check_real_list("weight_decay", weight_decay, minimum=0)
    if len(weight_decay) != 2 or not 0 < weight_decay[0] < weight_decay[1]:
        raise ValueError(f"weight_decay must be two doses [low, high] with 0 < low < high, "
                         f"got weight_decay={list(weight_decay)!r}")
    if train.weight_decay != 0:
        raise ValueError(f"train.weight_decay must be 0: the arms set it from weight_decay, "
                         f"got train.weight_decay={train.weight_decay!r}")
    if train.seed != 0:
        raise ValueError(f"train.seed is not used: each run's seed comes from seeds; leave it 0, "
                         f"got train.seed={train.seed!r}")
    jac = train.jacobian
    if not jac.enabled or jac.adaptive is not None:
        raise ValueError(f"train.jacobian must be the JR arm's fixed policy (gamma > 0, p > 0, no adaptive: "
                         f"the adaptive arm's policy is the section adaptive), got train.jacobian={jac!r}")
    if not isinstance(adaptive, AdaptiveGamma):
        raise ValueError(f"adaptive must be an AdaptiveGamma section, got adaptive={adaptive!r}")
    # The adaptive arm starts at the fixed arm's gamma: built here so that a start outside the
    # policy's bounds is named now, not when that arm starts.
    JacobianPenalty(gamma=jac.gamma, p=jac.p, n_probes=jac.n_probes, adaptive=adaptive)


@dataclass(frozen=True)
class TransformerPart:
    """The DEQ-Transformer (Post-LN) on WikiText: Figure 8 and Figure 10b's model.

    ``weight_decay``: the two doses ``[low, high]`` of the weight-decay arms (Adam's L2 term,
    ``train.optimizer``'s ``weight_decay``); ``adaptive``: the adaptive arm's gamma policy,
    started at ``train.jacobian.gamma``."""

    data: WikiTextData = field(default_factory=WikiTextData)
    model: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(jacobian=JacobianPenalty(gamma=1.6, p=0.35)))
    eval: MonitorConfig = field(default_factory=MonitorConfig)
    weight_decay: tuple[float, ...] = (1e-6, 1e-4)
    adaptive: AdaptiveGamma = field(default_factory=lambda: AdaptiveGamma(target=0.02, measure="fwd_rel_res"))

    def __post_init__(self) -> None:
        _check_part(self.train, self.weight_decay, self.adaptive)
        if self.model.pre_ln:
            raise ValueError("model.pre_ln must be false: Figure 8's DEQ-Transformer is Post-LN, "
                             "got model.pre_ln=True")


@dataclass(frozen=True)
class MDEQPart:
    """The MDEQ on CIFAR-10: Figure 10a's model (``weight_decay`` and ``adaptive`` as for the
    Transformer)."""

    data: CifarDataConfig = field(default_factory=CifarDataConfig)
    model: MDEQConfig = field(default_factory=MDEQConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(jacobian=JacobianPenalty(gamma=0.5, p=0.05)))
    eval: MonitorConfig = field(default_factory=MonitorConfig)
    weight_decay: tuple[float, ...] = (5e-5, 5e-4)
    adaptive: AdaptiveGamma = field(default_factory=lambda: AdaptiveGamma(target=0.02, measure="fwd_rel_res"))

    def __post_init__(self) -> None:
        _check_part(self.train, self.weight_decay, self.adaptive)


@dataclass(frozen=True)
class WeightDecayExperiment:
    """Supplement B.2 / B.3 at one scale: every arm of ``arms`` (:data:`ARMS`) for each model
    of ``models`` and every seed of ``seeds`` (the training seed: arms with one seed share the
    initialization, the dropout draws and the data order)."""

    transformer: TransformerPart = field(default_factory=TransformerPart)
    mdeq: MDEQPart = field(default_factory=MDEQPart)
    models: tuple[str, ...] = MODELS
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        check_choice_list("models", self.models, MODELS, distinct=True)
        check_choice_list("arms", self.arms, ARMS, distinct=True)
        check_int_list("seeds", self.seeds, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got seeds={list(self.seeds)!r}")

    def part(self, model: str) -> TransformerPart | MDEQPart:
        if model not in MODELS:
            raise ValueError(f"unknown model={model!r}; choose one of {list(MODELS)}")
        return self.transformer if model == "transformer" else self.mdeq

    @property
    def arm_names(self) -> list[str]:
        """``"<model>/<arm>"`` for every model and arm, model-major."""
        return [arm_name(m, a) for m in self.models for a in self.arms]


def arm_name(model: str, arm: str) -> str:
    return f"{model}/{arm}"


def split_arm(name: str) -> tuple[str, str]:
    """``"mdeq/jr"`` -> ``("mdeq", "jr")``, both checked."""
    model, _, arm = name.partition("/")
    if model not in MODELS or arm not in ARMS:
        raise ValueError(f"arm names are '<model>/<arm>' with model in {list(MODELS)} and arm in "
                         f"{list(ARMS)}, got {name!r}")
    return model, arm


def arm_train_config(part: TransformerPart | MDEQPart, arm: str, seed: int) -> TrainConfig:
    """``arm``'s training settings for ``seed``: weight decay at its dose, the penalty off,
    fixed (``train.jacobian``) or adaptive (``part.adaptive``, started at its gamma)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm={arm!r}; choose one of {list(ARMS)}")
    spec = ARMS[arm]
    jac = part.train.jacobian
    if spec.jr == "off":
        jac = JacobianPenalty(gamma=0.0, p=jac.p, n_probes=jac.n_probes)
    elif spec.jr == "adaptive":
        jac = JacobianPenalty(gamma=jac.gamma, p=jac.p, n_probes=jac.n_probes, adaptive=part.adaptive)
    wd = 0.0 if spec.dose is None else float(part.weight_decay[spec.dose])
    return replace(part.train, seed=int(seed), weight_decay=wd, jacobian=jac)
