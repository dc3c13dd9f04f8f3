"""Typed configuration read from ``params.yaml``.

``params.yaml`` holds ``profile: paper | small`` and one section per experiment with a block per
profile. :func:`load_experiment` picks the block, applies dotted overrides
(``{"train.max_steps": 3}``) and builds nested dataclasses with :func:`build`, which rejects
unknown keys (naming them and where they were) and lets each dataclass reject bad values.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

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


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans and floats.

    ``dvc exp run -S`` rewrites ``params.yaml`` with a YAML 1.2 writer (ruamel), which drops
    the quotes of ``mixed_precision: "no"`` and writes small floats as ``1e-05``. YAML 1.1
    (PyYAML's default) reads ``no`` (and ``yes``, ``on``, ``off``) as a boolean and a float
    without a dot (``1e-05``, ``1e-3``) or without a sign in its exponent (``1.0e5``) as a
    string. Reading with 1.2's rules keeps them the strings and floats they are.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# Integers as ruamel (DVC's YAML 1.2 reader) reads them: decimal (``010`` is ten, not 1.1's
# octal eight), ``0o`` / ``0x`` / ``0b``, ``_`` as a separator; 1.1's ``1:30`` (sexagesimal
# 90) stays a string.
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+)$"),
    list("-+0123456789"))


def _construct_int12(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    base = {"0o": 8, "0x": 16, "0b": 2}.get(text[:2], 10)
    return int(text[2:] if base != 10 else text, base)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int12)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.1's float needs a dot and a signed exponent; this adds every 1.2 float with an exponent.
# Plain integers do not match it (an exponent is required), so ``3`` stays an int.
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML as ``params.yaml`` is written: YAML 1.2 booleans (``no`` is a string)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.max_steps=3"`` -> ``("train.max_steps", 3)``: a command line's ``--set``, its value
    read as params.yaml is. An argparse ``type=``: a text without ``=`` is a usage error."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, load_yaml(value)


def load_params(path: str | Path = "params.yaml") -> dict:
    return load_yaml(Path(path).read_text()) or {}


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
