"""Models built on the DEQ layer."""

from .synthetic import SyntheticDEQ, SyntheticModelConfig
from .mdeq import MDEQ, MDEQConfig

__all__ = ["SyntheticDEQ", "SyntheticModelConfig"]
__all__ += ["MDEQ", "MDEQConfig"]
