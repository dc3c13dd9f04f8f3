"""Training: the settings, the random streams, the loop, checkpoints and evaluation across
processes. ``from deqlib.train import train, TrainConfig, TensorBatches`` is all most callers
need."""

from ..step import StepOutput
from .checkpoint import atomic_save, checkpoint_files
from .config import TrainConfig
from .evaluate import evaluate
from .loop import TrainResult, lr_factor, make_accelerator, make_optimizer, train
from .streams import TensorBatches

__all__ = ["TrainConfig", "StepOutput", "TensorBatches", "train", "TrainResult", "atomic_save", "evaluate",
           "make_accelerator", "make_optimizer", "lr_factor", "checkpoint_files"]
