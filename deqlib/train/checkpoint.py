"""Checkpoints that resume exactly and load safely.

Which run a checkpoint belongs to: it records the training config, the step count and the
caller's ``identity`` (the experiment's whole config); :func:`deqlib.train.train` does not
resume from one that differs in any of them (a warning names the keys).

Checkpoints are loaded with ``torch.load(weights_only=True)``: a file planted where a checkpoint
goes could otherwise run code when unpickled, before its run identity is even compared. So a
checkpoint holds tensors and plain values only (the run identity is converted on save), and one
that cannot be read (foreign, empty, cut short) is warned about, naming it, and not resumed from.

Per-process state: what a module keeps between steps through ``get_extra_state`` (the
DEQ-Transformer's segment memory) differs between processes, and the model checkpoint is
written by the main process alone. With more than one process, each also writes its own
``checkpoint.rank<r>.pt`` beside it, and on resume loads it when it is of the same step and
world size (else it warns, and the model's own checks start that state afresh).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_open, leftover_temporaries

__all__ = ["CHECKPOINT", "atomic_save", "plain_values", "read_checkpoint", "extra_states", "rank_path",
           "checkpoint_files", "load_rank_state", "differing_keys"]

CHECKPOINT = "checkpoint.pt"
_RANK_FILE = re.compile(r"checkpoint\.rank\d+\.pt")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`deqlib.atomic.atomic_open`: a kill mid-save leaves the
    previous checkpoint, never a part of the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def plain_values(obj: Any, where: str) -> Any:
    """``obj`` as the values ``torch.load(weights_only=True)`` reads back (dicts, lists, tuples,
    strings, numbers, None, tensors): a path becomes its string, a NumPy number its Python
    number. Anything else raises ValueError naming its key (``where``), before any training."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping):
        return {k: plain_values(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_values(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):  # a named tuple too: its class is not loadable
        return tuple(plain_values(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    raise ValueError(f"a checkpoint holds plain values only: {where}={obj!r} (a {type(obj).__name__}) "
                     "cannot be saved; give a string or number in its place")


def read_checkpoint(path: Path, consequence: str) -> Any:
    """``torch.load(path, weights_only=True)``, or None with a warning naming ``path`` when it
    cannot be read: a file that would run code when unpickled, or one cut short or emptied (a
    full disk, an interrupted copy). Such a file must not stop every later run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the file holds, the run goes on without it
        first = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"cannot read the checkpoint {path} ({type(err).__name__}: {first}); {consequence}",
                      stacklevel=3)
        return None


def extra_states(model: nn.Module) -> dict[str, Any]:
    """The ``..._extra_state`` entries of ``model.state_dict()`` (what modules keep through
    ``get_extra_state``)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}


def rank_path(ckpt_path: Path, rank: int) -> Path:
    return ckpt_path.with_name(f"{ckpt_path.stem}.rank{rank}{ckpt_path.suffix}")


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """The files :func:`train` has written in ``run_dir`` (its checkpoint, the per-process
    files, temporaries a killed save left), sorted; what else the folder holds is not listed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    ours = [p for p in run_dir.iterdir() if p.name == CHECKPOINT or _RANK_FILE.fullmatch(p.name)]
    ours += [t for p in [run_dir / CHECKPOINT, *ours] for t in leftover_temporaries(p)]
    return sorted(set(ours))


def load_rank_state(model: nn.Module, path: Path, step: int, world: int) -> None:
    """Give each module its own process's extra state from ``path``, if it matches the run."""
    state = None
    if path.exists():
        state = read_checkpoint(path, "this process resumes with the main process's state")
        if state is None:
            return
    if not (isinstance(state, dict) and {"step", "world", "extra"} <= set(state)):
        state = None
    if state is None or state["step"] != step or state["world"] != world:
        found = "none" if state is None else f"step {state['step']} of a {state['world']}-process run"
        warnings.warn(f"no per-process state for step {step} of this {world}-process run at {path} "
                      f"(found {found}); this process resumes with the main process's", stacklevel=2)
        return
    model.load_state_dict(state["extra"], strict=False)  # only these keys: set_extra_state


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys at which two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(all)"]
