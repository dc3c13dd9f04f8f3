"""Models built on the DEQ layer."""

from .synthetic import SyntheticDEQ, SyntheticModelConfig

__all__ = ["SyntheticDEQ", "SyntheticModelConfig"]
