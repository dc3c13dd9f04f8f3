"""CIFAR-10 with a multiscale DEQ, with and without Jacobian regularization (Tables 2 and 3).

The data are CIFAR-10's (or a slice in its layout); everything else is the shared image
classification experiment (:mod:`deqlib.experiments.image_classification`): the arms (the
unregularized MDEQ, MDEQ + JR, the gamma sweep of Table 3, the explicit weight-tied stack), the
training of one arm for one seed (:func:`run_arm`), the measurements and the claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..data.cifar import Cifar10, CifarDataConfig, CifarTransform, load_cifar10, normalize
from ..jacobian import JacobianPenalty
from ..models.mdeq import MDEQConfig
from ..train import TensorBatches, TrainConfig
from .image_classification import ArmsConfig, ClassificationEvalConfig, check_experiment
from .image_classification import run_arm as run_arm  # the shared verb, for this experiment's data

__all__ = ["CifarExperiment", "CifarImages", "TensorEval", "load_data", "run_arm"]


@dataclass(frozen=True)
class CifarExperiment:
    """The ``cifar10`` section of ``params.yaml``: data, model, training (``train.jacobian`` is
    the MDEQ + JR arm's penalty), the arms, the seeds every arm runs with, and the evaluation."""

    data: CifarDataConfig = field(default_factory=CifarDataConfig)
    model: MDEQConfig = field(default_factory=MDEQConfig)
    # Table 2's MDEQ + JR penalty (gamma 0.5 = the JR arm, one of arms.gammas, drawn with p 0.05)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(jacobian=JacobianPenalty(gamma=0.5, p=0.05)))
    arms: ArmsConfig = field(default_factory=ArmsConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    eval: ClassificationEvalConfig = field(default_factory=ClassificationEvalConfig)

    def __post_init__(self) -> None:
        check_experiment(self)
        if self.model.image_size != 32 or self.model.in_channels != 3:
            raise ValueError(f"model.image_size must be 32 with in_channels 3 (CIFAR-10 images), got "
                             f"model.image_size={self.model.image_size!r}, in_channels={self.model.in_channels!r}")


class TensorEval:
    """Test images in memory, served as :class:`~deqlib.experiments.image_classification.EvalSource`:
    ``batch(start, stop)`` is ``(normalized float (B, 3, 32, 32), labels (B,))``."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels, self.n_items = images, labels, len(labels)

    def batch(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return normalize(self.images[start:stop]), self.labels[start:stop]


@dataclass
class CifarImages:
    """CIFAR-10 for the shared experiment: training batches augmented as configured (random crop
    from the ``pad``-padded image, horizontal flip), test images only normalized."""

    data: Cifar10
    augment: bool = True
    pad: int = 4

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data.classes

    def train_batches(self, batch_size: int, seed: int) -> TensorBatches:
        return TensorBatches((self.data.train_x, self.data.train_y), batch_size, seed=seed,
                             transform=CifarTransform(self.augment, self.pad))

    def eval_batches(self) -> TensorEval:
        return TensorEval(self.data.test_x, self.data.test_y)


def load_data(exp: CifarExperiment, base: str | Path | None = None) -> CifarImages:
    """The configured CIFAR-10 (a relative root is resolved against ``base``), cut to the first
    ``data.n_train`` / ``data.n_test`` images when those are set."""
    d = load_cifar10(exp.data.root, base, exp.data.download)
    tr, te = slice(exp.data.n_train), slice(exp.data.n_test)
    cut = Cifar10(d.train_x[tr], d.train_y[tr], d.test_x[te], d.test_y[te], d.classes)
    return CifarImages(cut, exp.data.augment, exp.data.pad)
