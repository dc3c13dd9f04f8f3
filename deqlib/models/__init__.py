"""Models built on the DEQ layer."""

from .synthetic import SyntheticDEQ, SyntheticModelConfig
from .transformer import DEQTransformerLM, TransformerConfig

__all__ = ["SyntheticDEQ", "SyntheticModelConfig", "DEQTransformerLM", "TransformerConfig"]
