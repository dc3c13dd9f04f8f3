"""Every image of a split checked before training, at a level (``"list"``, ``"header"``,
``"decode"``; see :mod:`deqlib.data.imagenet`), over loader worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from ...checks import check_choice, check_int
from .config import CHECK_LEVELS
from .folder import ImageFolder

__all__ = ["check_images"]


def _jpeg_has_end_marker(path: Path) -> bool:
    """Whether the last KiB holds the JPEG end-of-image marker FF D9. In the entropy-coded data
    a 0xFF byte is always followed by 0x00 or a restart marker, so FF D9 there is the end."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - 1024))
        return b"\xff\xd9" in fh.read()


def _check_file(path: Path, level: str) -> str | None:
    """Why ``path`` is not a usable image at ``level`` (None when it is)."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        if level == "list":
            return None
        with Image.open(path) as im:
            w, h = im.size
            if w < 1 or h < 1:
                return f"image of size {w}x{h}"
            if level == "decode" or im.format != "JPEG" or not _jpeg_has_end_marker(path):
                im.load()  # decodes: a truncated or corrupt file raises here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


class _CheckFiles(torch.utils.data.Dataset):
    def __init__(self, split: ImageFolder, level: str):
        self.split, self.level = split, level

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[int, str | None]:
        return index, _check_file(self.split.path(index), self.level)


def _as_list(batch: list) -> list:
    return batch


def check_images(split: ImageFolder, level: str = "header", workers: int = 0) -> None:
    """Check every image of ``split`` at ``level`` (``"list"``, ``"header"``, ``"decode"``; see
    :mod:`deqlib.data.imagenet`), over ``workers`` loader processes.

    Raises:
        ValueError: naming the number of bad files and the first ten, each with its reason.
    """
    check_choice("level", level, CHECK_LEVELS)
    check_int("workers", workers, 0, 256)
    bad: list[tuple[int, str]] = []
    loader = torch.utils.data.DataLoader(_CheckFiles(split, level), batch_size=256, num_workers=workers,
                                         collate_fn=_as_list)
    for batch in loader:
        bad.extend((i, why) for i, why in batch if why is not None)
    if bad:
        bad.sort()
        lines = "; ".join(f"{split.path(i)} ({why})" for i, why in bad[:10])
        raise ValueError(f"{len(bad)} unreadable image(s) in {split.folder} (check={level!r}): {lines}"
                         + ("; ..." if len(bad) > 10 else ""))
