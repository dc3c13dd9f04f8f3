"""Data sets: the 1D synthetic target (more to come: CIFAR-10, WikiText, ImageNet)."""

from .synthetic import SyntheticConfig, make_synthetic, target_function

__all__ = ["SyntheticConfig", "make_synthetic", "target_function"]
