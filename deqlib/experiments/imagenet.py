"""ImageNet with MDEQ-small, with and without Jacobian regularization (Table 2's ImageNet rows).

The data are an ImageNet folder in the ImageFolder layout (:mod:`deqlib.data.imagenet`: the full
ILSVRC-2012 set, prepared from its archives, or a slice of it); everything else is the shared
image classification experiment (:mod:`deqlib.experiments.image_classification`), as for
CIFAR-10, with top-5 accuracy beside top-1.

Training on several processes (the paper's 4 GPUs, data parallel) runs the same
:func:`run_arm` under the launcher::

    accelerate launch --num_processes 4 -m deqlib.experiments.imagenet --profile paper \\
        --run-dir outputs/imagenet/checkpoints

Each process trains on its share of every batch and evaluates its share of the validation
batches; the checkpoints it leaves under ``<run-dir>/<arm>/seed<k>`` are the ones
``python -m pipelines.run imagenet`` (one process) resumes from, so the notebook then measures
the trained arms without training them again.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.imagenet import ImageNetData, ImageNetDataConfig, load_imagenet
from ..jacobian import JacobianPenalty
from ..report.claims import Claim
from ..models.mdeq import MDEQConfig
from ..train import TrainConfig, make_accelerator
from .image_classification import CLAIMS as CIFAR_CLAIMS
from .image_classification import ArmsConfig, ClassificationEvalConfig, arm_specs, check_experiment
from .image_classification import run_arm as run_arm  # the shared verb, for this experiment's data

__all__ = ["CLAIMS", "ImageNetExperiment", "load_data", "run_arm", "main"]

# The image classifier's claims with where the paper makes them for ImageNet (top-1 accuracy);
# where it gives no ImageNet figure, the CIFAR-10 one the claim comes from is named as such.
_SOURCES = {
    "nfe": "Table 2 (ImageNet): MDEQ-small 27 NFE, + JR 14; Section 5.3: roughly 2x",
    "nfe_plain": "Table 2; Section 3.1",
    "hard_stop": "Table 2 has no hard-stopped ImageNet row; CIFAR-10: 93.6% solved, 89.1% at 6 NFE",
    "jr_at_k": "Table 2: no ImageNet row at matched NFE; CIFAR-10: 93.1% against 89.1% at 6 NFE",
    "flat": "Table 3 (CIFAR-10); no ImageNet figure",
    "close": "Table 2 (ImageNet): MDEQ-small + JR 74.5% at 14 NFE against 75.4% at 27",
}
CLAIMS: dict[str, Claim] = {key: replace(c, source=_SOURCES.get(key, c.source)) for key, c in CIFAR_CLAIMS.items()}


@dataclass(frozen=True)
class ImageNetExperiment:
    """The ``imagenet`` section of ``params.yaml``: data, model, training (``train.jacobian`` is
    the MDEQ + JR arm's penalty), the arms, the seeds every arm runs with, and the evaluation.
    The model's ``image_size`` must be the data's crop size (``data.train_size`` and
    ``data.eval_size``); its ``num_classes`` is checked against the folder's classes when the
    data are loaded."""

    data: ImageNetDataConfig = field(default_factory=ImageNetDataConfig)
    model: MDEQConfig = field(default_factory=lambda: MDEQConfig(
        channels=(32, 64, 128, 256), head_channels=(32, 64, 128, 256), final_channels=2048, dropout=0.02,
        downsample=2, num_classes=1000, image_size=224))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(jacobian=JacobianPenalty(gamma=2.0, p=0.1)))
    arms: ArmsConfig = field(default_factory=lambda: ArmsConfig(gammas=(0.0, 2.0)))
    seeds: tuple[int, ...] = (0,)
    eval: ClassificationEvalConfig = field(default_factory=ClassificationEvalConfig)

    def __post_init__(self) -> None:
        check_experiment(self)
        sizes = {"data.train_size": self.data.train_size, "data.eval_size": self.data.eval_size}
        if any(v != self.model.image_size for v in sizes.values()):
            raise ValueError(f"model.image_size must equal the crop sizes the data serve, got "
                             f"model.image_size={self.model.image_size!r} with "
                             + ", ".join(f"{k}={v!r}" for k, v in sizes.items()))
        if self.model.in_channels != 3:
            raise ValueError("model.in_channels must be 3 (RGB images), got "
                             f"model.in_channels={self.model.in_channels!r}")


def load_data(exp: ImageNetExperiment, base: str | Path | None = None) -> ImageNetData:
    """The configured ImageNet folder, indexed and checked (a relative root resolves against
    ``base``); raises ValueError, before any training, when the folder's classes are not
    ``model.num_classes`` or anything :func:`deqlib.data.imagenet.load_imagenet` refuses."""
    data = load_imagenet(exp.data, base)
    if len(data.classes) != exp.model.num_classes:
        raise ValueError(f"{data.folder} holds {len(data.classes)} classes, but model.num_classes="
                         f"{exp.model.num_classes!r}; set model.num_classes to {len(data.classes)}")
    return data


def main(argv: list[str] | None = None) -> int:
    """Train and measure the arms for the seeds, on as many processes as the launcher started;
    the main process prints one JSON line of metrics per run."""
    from ..config import load_experiment, parse_override

    ap = argparse.ArgumentParser(prog="python -m deqlib.experiments.imagenet", description=main.__doc__)
    ap.add_argument("--profile", default="paper", help="the params.yaml profile (paper or small)")
    ap.add_argument("--params", default="params.yaml", help="the parameter file (relative data roots resolve "
                                                            "against its folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=parse_override,
                    help="override a setting, e.g. --set train.max_steps=3 (repeatable)")
    ap.add_argument("--arm", action="append", default=None, help="an arm to run (repeatable; default: every arm)")
    ap.add_argument("--seed", action="append", type=int, default=None, help="a seed to run (default: the profile's)")
    ap.add_argument("--run-dir", default=None, help="checkpoint under RUN_DIR/<arm>/seed<k> (resumable)")
    args = ap.parse_args(argv)
    try:
        overrides = dict(args.set)
        exp = load_experiment(ImageNetExperiment, "imagenet", args.profile, overrides, args.params)
        arms = args.arm or list(arm_specs(exp))
        unknown = [a for a in arms if a not in arm_specs(exp)]
        if unknown:
            raise ValueError(f"unknown --arm {unknown}; choose from {list(arm_specs(exp))}")
        data = load_data(exp, Path(args.params).resolve().parent)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for seed in args.seed or exp.seeds:
        for arm in arms:
            run_dir = None if args.run_dir is None else Path(args.run_dir) / arm / f"seed{seed}"
            res = run_arm(exp, arm, seed, data, run_dir=run_dir)
            if make_accelerator(exp.train).is_main_process:
                print(json.dumps({"arm": arm, "seed": seed, **res.metrics}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
