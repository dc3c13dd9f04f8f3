"""Typed configuration read from ``params.yaml``.

``params.yaml`` holds ``profile: paper | small`` and one section per experiment with a block per
profile. :func:`load_experiment` picks the block, applies dotted overrides
(``{"train.max_steps": 3}``) and builds nested dataclasses with :func:`build`, which rejects
unknown keys (naming them and where they were) and lets each dataclass reject bad values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

__all__ = ["build", "load_yaml", "parse_override", "load_params", "load_experiment", "apply_overrides", "to_dict",
           "training_identity", "PROFILES"]

PROFILES = ("paper", "small")
T = TypeVar("T")


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def build(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a dict, recursing into dataclass-typed fields.

    Raises ValueError naming unknown keys (with their path) and wrapping value errors with the
    path of the section they came from.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where or cls.__name__}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints[name])
        path = f"{where}.{name}" if where else name
        if sub is not None and isinstance(value, dict):
            value = build(sub, value, path)
        elif sub is not None and not (value is None and _allows_none(hints[name])):
            # Caught here, not at the first use of the section deep inside a run.
            raise ValueError(f"{path} must be a section (a mapping of keys to values), got {path}={value!r}")
        elif isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        elif hints[name] is bool and not isinstance(value, bool):
            # ``no`` and ``off`` are strings in YAML 1.2, and a non-empty string is truthy: a
            # ``download=no`` would download.
            raise ValueError(f"{path} must be true or false, got {path}={value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"in {where or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> dict:
    """A plain (YAML/JSON-able) dict of a dataclass tree."""
    return dataclasses.asdict(obj)


def training_identity(exp: Any) -> dict:
    """What makes an experiment's training runs these ones, for the checkpoint to be resumed
    from (:func:`deqlib.train.train`'s ``identity``): the whole config but its ``eval``
    section, which is read only after training (changing it must not discard a trained arm)."""
    return {"experiment": {k: v for k, v in to_dict(exp).items() if k != "eval"}}


def _yaml() -> YAML:
    """ruamel's safe loader, DVC's own YAML reader (``dvc exp run -S`` rewrites params.yaml
    with ruamel): YAML 1.2, so ``no`` and ``off`` are strings, ``1e-05`` is a float and ``010``
    is ten, as DVC reads them; plain dicts, lists and scalars, never a Python object; and a
    duplicate key refused (DVC calls such a file corrupted; read here, the last one would win).
    A fresh loader per call: ruamel's loaders are not reentrant."""
    yaml = YAML(typ="safe", pure=True)
    yaml.allow_duplicate_keys = False
    return yaml


def _where(err: YAMLError, source: str) -> str:
    """One line naming ``source``, the line and column, and what is wrong there."""
    mark = getattr(err, "problem_mark", None)
    if not isinstance(err, MarkedYAMLError) or mark is None:
        return f"{source}: {err}"
    text = f"{source}, line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    context_mark = getattr(err, "context_mark", None)
    if err.context:
        text += f" ({err.context}" + (f" at line {context_mark.line + 1}" if context_mark else "") + ")"
    return text


def load_yaml(text: str, source: str = "<text>") -> Any:
    """Parse YAML as ``params.yaml`` is read (:func:`_yaml`). Raises ValueError naming
    ``source`` (a file name, say), the line and the column of a syntax error or duplicate key."""
    try:
        return _yaml().load(text)
    except YAMLError as err:
        raise ValueError(_where(err, source)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.max_steps=3"`` -> ``("train.max_steps", 3)``: a command line's ``--set``, its value
    read as params.yaml is. An argparse ``type=``: a text without ``=`` is a usage error."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, load_yaml(value, f"--set {text!r}")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def load_params(path: str | Path = "params.yaml") -> dict:
    """The parsed params file; ValueError naming the file and line of a syntax error or a
    duplicate key, or naming the file when it does not hold a mapping of sections."""
    params = load_yaml(Path(path).read_text(), str(path)) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(params).__name__} {params!r}")
    return params


def apply_overrides(section: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of ``section`` with dotted keys set (``"train.max_steps": 3``).

    Keys need not be present in the YAML (a default may be overridden); :func:`build` then
    rejects any that the config classes do not know, so a typo still fails loudly.
    """
    out = _deepcopy(section)
    for dotted, value in (overrides or {}).items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_experiment(
    cls: type[T],
    experiment: str,
    profile: str,
    overrides: dict[str, Any] | None = None,
    params_path: str | Path = "params.yaml",
) -> T:
    """The config of ``experiment`` for ``profile`` from ``params.yaml``, overrides applied."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile={profile!r}; choose one of {list(PROFILES)}")
    params = load_params(params_path)
    if experiment not in params:
        raise ValueError(f"no section {experiment!r} in {params_path}; it has {sorted(params)}")
    blocks = params[experiment]
    if profile not in blocks:
        raise ValueError(f"section {experiment!r} has no profile {profile!r}")
    section = apply_overrides(blocks[profile], overrides or {})
    return build(cls, section, f"{experiment}.{profile}")
