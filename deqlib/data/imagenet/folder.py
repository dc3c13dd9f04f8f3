"""The index of one split of the ImageFolder layout (:func:`scan_image_folder`), the layout
error that names the ``prepare`` command, and the class names of a ``classes.tsv``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...checks import check_int
from .config import IMAGE_SUFFIXES
from .prepare import PREPARE_COMMAND

__all__ = ["ImageFolder", "layout_error", "scan_image_folder", "read_class_names"]


@dataclass(frozen=True, eq=False)
class ImageFolder:
    """One split: ``folder/<class>/<file>`` for every image, classes in sorted order.

    ``files`` holds the paths relative to ``folder`` as a NumPy bytes array, not a list of
    strings: forked loader workers share it without touching a reference count per path
    (which would copy a list of 1.28 M Python objects into every worker, page by page).
    """

    folder: Path
    classes: tuple[str, ...]
    files: np.ndarray  # (N,) bytes, "wnid/name"
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.folder / os.fsdecode(self.files[index])


def layout_error(folder: Path, what: str) -> ValueError:
    """The error for a folder not in the layout: ``what``, the layout expected, and the
    ``prepare`` command that makes it."""
    return ValueError(
        f"{what}: expected the ImageFolder layout {folder}/train/<wnid>/*.JPEG and "
        f"{folder}/val/<wnid>/*.JPEG (one folder per WordNet id). To make it from the official "
        "ILSVRC-2012 archives (downloaded from https://image-net.org/, which needs an account): "
        + PREPARE_COMMAND.format(out=folder))


def scan_image_folder(split: str | os.PathLike, max_per_class: int | None = None) -> ImageFolder:
    """List ``split/<class>/*`` (``.JPEG``, ``.jpg``, ``.png``, any case; hidden entries skipped).

    Args:
        max_per_class: keep the first this many files (sorted) of each class.
    Raises:
        ValueError: ``split`` is not a folder, holds image files outside class folders, holds no
            class folder, or a class folder holds no image (each naming the path).
    """
    split = Path(split)
    check_int("max_per_class", max_per_class, 1, optional=True)
    if not split.is_dir():
        raise ValueError(f"{split} is not a folder")
    classes, loose = [], []
    with os.scandir(split) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                classes.append(entry.name)
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                loose.append(entry.name)
    if loose:  # e.g. the validation tar extracted as it is, not sorted into class folders
        raise ValueError(f"{split} holds {len(loose)} image files outside class folders (e.g. "
                         f"{sorted(loose)[0]}): each image must be in {split}/<wnid>/")
    if not classes:
        raise ValueError(f"{split} holds no class folders (expected {split}/<wnid>/*.JPEG)")
    classes.sort()
    files: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        with os.scandir(split / name) as it:
            names = sorted(e.name for e in it if not e.name.startswith(".") and e.is_file()
                           and e.name.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"class folder {split / name} holds no images (*.JPEG, *.jpg, *.png)")
        names = names[:max_per_class]
        files.extend(os.fsencode(f"{name}/{n}") for n in names)
        labels.extend([label] * len(names))
    return ImageFolder(split, tuple(classes), np.array(files, dtype=np.bytes_), np.array(labels, dtype=np.int64))


def read_class_names(path: Path, classes: Sequence[str]) -> tuple[str, ...]:
    """The names of ``classes`` from a ``classes.tsv`` (a header line, then ``wnid``, index,
    name, ... per line, tab-separated). Raises ValueError naming the file and the line."""
    names: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t")[:1] != ["wnid"]:
        raise ValueError(f"{path}: the first line must be a header starting with 'wnid', got {lines[:1]}")
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 3 or not cols[0] or not cols[2]:
            raise ValueError(f"{path} line {n}: expected wnid<TAB>index<TAB>name, got {line!r}")
        names[cols[0]] = cols[2]
    missing = [c for c in classes if c not in names]
    if missing:
        raise ValueError(f"{path} names no class {missing[:10]} ({len(missing)} of the folder's classes)")
    return tuple(names[c] for c in classes)
