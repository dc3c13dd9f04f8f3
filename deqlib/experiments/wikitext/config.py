"""The WikiText experiment's configuration: its arms (Table 1 / Table 5's rows), their NFE
thresholds, the seeds, and how the trained models are measured."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from ...checks import check_choice_list, check_int, check_int_list, check_mapping, check_real
from ...config import build
from ...data.wikitext import WikiTextData
from ...models.transformer import TransformerConfig
from ...train import TrainConfig

__all__ = ["ARMS", "Arm", "ArmThreshold", "LMEvalConfig", "WikiTextExperiment", "ArmSettings", "arm_settings"]


class Arm(NamedTuple):
    """What an arm is: Pre-LN or Post-LN, the Jacobian penalty on or off, the explicit stack."""

    pre_ln: bool
    jr: bool
    explicit: bool
    row: str  # its row of Table 1 / Table 5


ARMS: dict[str, Arm] = {
    "post_ln": Arm(False, False, False, "DEQ-Transformer Post-LN (30 / 30 NFE)"),
    "post_ln_reduced": Arm(False, False, False, "DEQ Post-LN at a reduced threshold (20 / 20; 15 diverged)"),
    "pre_ln": Arm(True, False, False, "DEQ Pre-LN without JR (diverged)"),
    "post_ln_jr": Arm(False, True, False, "DEQ Post-LN + JR (13 / 12 NFE)"),
    "pre_ln_jr": Arm(True, True, False, "DEQ Pre-LN + JR (14 / 14 NFE)"),
    "explicit": Arm(False, False, True, "explicit weight-tied stack (paper: Transformer-XL)"),
}


@dataclass(frozen=True)
class ArmThreshold:
    """An arm's forward / backward NFE thresholds (None: ``train.forward`` / ``train.backward``'s
    ``max_iter``), and the official code's jitter: on every training step the forward threshold
    is lowered by an integer drawn from ``0..jitter``."""

    forward: int | None = None
    backward: int | None = None
    jitter: int = 0

    def __post_init__(self) -> None:
        check_int("forward", self.forward, 1, optional=True)
        check_int("backward", self.backward, 1, optional=True)
        check_int("jitter", self.jitter, 0)


@dataclass(frozen=True)
class LMEvalConfig:
    """How the trained models are measured.

    Attributes:
        batch_size: streams of the evaluation split. max_tokens: its leading tokens used (None:
            all). nfe_caps: forward NFE caps of the perplexity-vs-NFE curve. memory_batch: the
            batch of the memory measurements (the paper's 15).
        monitor_every: training steps between two measurements of ``||J_f||_F`` and the
            spectral radius on the fixed monitor batch (0: only after the last step).
        monitor_batch: streams of that batch (its second segment, the first one's memory
            carried). jac_probes: Hutchinson probes of ``||J||_F``. radius_iters, radius_vectors:
            the subspace iteration's most steps and block size.
        tol: the relative residual plain iteration is counted to (NFE to tol), capped at
            plain_nfe_cap calls.
        leak: measure :func:`~.measure.future_token_leak` at each arm's threshold.
    """

    batch_size: int = 10
    max_tokens: int | None = None
    nfe_caps: tuple[int, ...] = (4, 8, 12, 20, 30)
    memory_batch: int = 15
    monitor_every: int = 5000
    monitor_batch: int = 4
    jac_probes: int = 4
    radius_iters: int = 150
    radius_vectors: int = 8
    tol: float = 1e-3
    plain_nfe_cap: int = 100
    leak: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "memory_batch", "monitor_batch", "jac_probes", "radius_iters",
                     "radius_vectors", "plain_nfe_cap"):
            check_int(name, getattr(self, name), 1)
        check_int("monitor_every", self.monitor_every, 0)
        check_int_list("nfe_caps", self.nfe_caps, 1, nonempty=False, increasing=True)
        check_int("max_tokens", self.max_tokens, 2, optional=True)
        check_real("tol", self.tol, minimum=0, maximum=1, min_open=True, max_open=True)
        if self.max_tokens is not None and self.max_tokens < 2 * self.batch_size:
            # Each of the batch_size streams needs two tokens: an input and its target.
            raise ValueError(f"max_tokens must be null or >= 2 * batch_size = {2 * self.batch_size}, "
                             f"got max_tokens={self.max_tokens!r}")
        if not isinstance(self.leak, bool):
            raise ValueError(f"leak must be true or false, got leak={self.leak!r}")


@dataclass(frozen=True)
class WikiTextExperiment:
    """Table 1 / Table 5 at one scale.

    ``arms``: names from :data:`ARMS`; ``seeds``: every arm trains once per seed (the training
    seed: the same seed gives two arms the same initialization of what they share, the same
    dropout draws and the same data). ``thresholds``: per arm, NFE thresholds other than
    ``train.forward`` / ``train.backward``'s ``max_iter`` (Table 4's 12 / 12), e.g. the
    unregularized rows' 30 / 30. ``train.seed`` must stay 0: the seeds come from ``seeds``.
    """

    data: WikiTextData = field(default_factory=WikiTextData)
    model: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2)
    thresholds: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice_list("arms", self.arms, ARMS, distinct=True)
        check_int_list("seeds", self.seeds, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got seeds={list(self.seeds)!r}")
        if self.train.seed != 0:
            raise ValueError(f"train.seed is not used: each run's seed comes from seeds; leave it 0, "
                             f"got train.seed={self.train.seed!r}")
        check_mapping("thresholds", self.thresholds)
        built = {}
        for arm, spec in self.thresholds.items():
            if arm not in ARMS or ARMS[arm].explicit:
                raise ValueError(f"thresholds keys must be DEQ arms from "
                                 f"{sorted(a for a in ARMS if not ARMS[a].explicit)}, got thresholds.{arm}")
            if not isinstance(spec, ArmThreshold):
                check_mapping(f"thresholds.{arm}", spec)
                spec = build(ArmThreshold, dict(spec), f"thresholds.{arm}")
            built[arm] = spec
        object.__setattr__(self, "thresholds", built)
        for arm in built:
            thr = self.threshold(arm)
            if thr.jitter >= thr.forward:
                raise ValueError(f"thresholds.{arm}.jitter must be below its forward threshold {thr.forward}, "
                                 f"got thresholds.{arm}.jitter={thr.jitter}")

    def threshold(self, arm: str) -> ArmThreshold:
        """``arm``'s thresholds, resolved: its entry in ``thresholds``, ``train``'s where unset."""
        spec = self.thresholds.get(arm) or ArmThreshold()
        return ArmThreshold(spec.forward or self.train.forward.max_iter, spec.backward or self.train.backward.max_iter,
                            spec.jitter)


class ArmSettings(NamedTuple):
    model: TransformerConfig
    train: TrainConfig
    explicit: bool
    forward_jitter: int


def arm_settings(exp: WikiTextExperiment, arm: str, seed: int = 0) -> ArmSettings:
    """``arm``'s model and training configuration for ``seed``: the normalization, the NFE
    thresholds, the penalty switched off for arms without it, no pretraining for the explicit
    stack."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm={arm!r}; choose one of {sorted(ARMS)}")
    spec = ARMS[arm]
    thr = exp.threshold(arm)
    model = replace(exp.model, pre_ln=spec.pre_ln)
    cfg = replace(exp.train, seed=int(seed), forward=exp.train.forward.replace(max_iter=thr.forward),
                  backward=exp.train.backward.replace(max_iter=thr.backward))
    if not spec.jr:
        cfg = replace(cfg, jacobian=replace(cfg.jacobian, gamma=0.0, gamma_end=None, adaptive=None))
    if spec.explicit:
        cfg = replace(cfg, pretrain_steps=0)
    return ArmSettings(model, cfg, spec.explicit, 0 if spec.explicit else thr.jitter)
