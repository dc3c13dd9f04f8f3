"""What a benchmark runs in: its device (chosen, and named in the report) and the checkout's
params.yaml (where the profiles are read from unless a benchmark is given another)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["CHECKOUT_PARAMS", "pick_device", "device_name"]

CHECKOUT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` (e.g. ``"cpu"``, ``"cuda"``), or CUDA when there is one, else the CPU."""
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(dev: torch.device) -> str:
    """The device a report was measured on, in words."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
