"""One plotting style, the setup line every training notebook prints, and the settings where a
run departs from the paper profile."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["use_style", "print_setup", "flatten", "departures"]


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


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: ``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (an
    empty block stays one value)."""
    items: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items.update(flatten(value, name + "."))
        else:
            items[name] = value
    return items


def departures(run: Mapping[str, Any], paper: Mapping[str, Any]) -> list[dict[str, str]]:
    """Every setting where the config ``run`` differs from ``paper`` (both ``to_dict`` of one
    experiment), sorted by key: ``{"setting", "paper profile", "this run"}``, values as text
    ("-" where a side lacks the key); empty when the run is the paper profile."""
    mine, theirs = flatten(run), flatten(paper)
    return [{"setting": k, "paper profile": str(theirs.get(k, "-")), "this run": str(mine.get(k, "-"))}
            for k in sorted(set(mine) | set(theirs)) if mine.get(k, "-") != theirs.get(k, "-")]


def use_style() -> None:
    """The suite's one plotting style."""
    import matplotlib

    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.dpi": 80, "savefig.dpi": 120, "figure.autolayout": True})
