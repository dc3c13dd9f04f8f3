"""Models built on the DEQ layer."""

from .synthetic import SyntheticDEQ, SyntheticModelConfig
from .mdeq import MDEQ, MDEQConfig

from .transformer import DEQTransformerLM, TransformerConfig

__all__ = ["SyntheticDEQ", "SyntheticModelConfig", "MDEQ", "MDEQConfig", "DEQTransformerLM", "TransformerConfig"]
