"""One plotting style, and the setup line every training notebook prints."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["use_style", "print_setup"]


def print_setup(profile: str, cfg: Mapping[str, Any], penalty: str = "Jacobian penalty",
                penalty_hides: Iterable[str] = ()) -> None:
    """Print a training notebook's setup, one line per block of its config (``to_dict`` of an
    experiment with ``data``, ``model``, ``train`` and ``eval``): data, model, training, the
    forward and backward solvers, the Jacobian penalty (labelled ``penalty``, without the keys
    in ``penalty_hides``, e.g. a gamma the notebook sweeps, nor an unset ``adaptive``: a fixed
    schedule's line reads as before there was an adaptive policy) and evaluation."""
    train = cfg["train"]
    hidden = set(penalty_hides) | ({"adaptive"} if train["jacobian"].get("adaptive") is None else set())
    setup = {
        "data": cfg["data"],
        "model": cfg["model"],
        "train": {k: v for k, v in train.items() if k not in ("forward", "backward", "jacobian")},
        "forward solver": train["forward"],
        "backward solver": train["backward"],
        penalty: {k: v for k, v in train["jacobian"].items() if k not in hidden},
        "evaluation": cfg["eval"],
    }
    print(f"profile: {profile}")
    for name, block in setup.items():
        print(f"{name:>17}: {block}")


def use_style() -> None:
    """The suite's one plotting style."""
    import matplotlib

    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.dpi": 80, "savefig.dpi": 120, "figure.autolayout": True})
