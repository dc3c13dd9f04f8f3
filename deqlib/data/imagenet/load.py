"""A checked data set: :func:`load_imagenet` indexes, checks and (with ``preload``) decodes the
folder; :class:`ImageNetData` serves its training and evaluation batches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ...checks import check_int
from ..download import data_root
from .batches import ImageDataset, ImageNetBatches, ImageNetEval, preload_images
from .checks import check_images
from .config import ImageNetDataConfig
from .folder import ImageFolder, layout_error, read_class_names, scan_image_folder
from .prepare import CLASSES_FILE
from .transforms import EvalTransform, TrainTransform

__all__ = ["ImageNetData", "load_imagenet"]


@dataclass(eq=False)
class ImageNetData:
    """A checked data set: both splits' indexes, class names, and (with ``preload``) the
    images in memory. :meth:`train_batches` and :meth:`eval_batches` serve them."""

    cfg: ImageNetDataConfig
    folder: Path
    train: ImageFolder
    val: ImageFolder
    class_names: tuple[str, ...]
    train_images: Tensor | None = None  # uint8 (N, 3, s, s) with preload
    val_images: Tensor | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    def train_batches(self, batch_size: int, seed: int = 0) -> ImageNetBatches:
        """Training batches of ``batch_size`` (the global batch) with the config's augmentation."""
        check_int("seed", seed, 0)
        c = self.cfg
        source = self.train if self.train_images is None else self.train_images
        ds = ImageDataset(source, self.train.labels, TrainTransform(c.train_size, c.scale, c.flip, seed))
        return ImageNetBatches(ds, batch_size, seed, c.workers)

    def eval_batches(self) -> ImageNetEval:
        """The validation split, resized and centre-cropped, for ``evaluate``."""
        c = self.cfg
        source = self.val if self.val_images is None else self.val_images
        return ImageNetEval(ImageDataset(source, self.val.labels, EvalTransform(c.eval_resize, c.eval_size)), c.workers)


def load_imagenet(cfg: ImageNetDataConfig, base: str | os.PathLike | None = None) -> ImageNetData:
    """Index, check and (with ``cfg.preload``) decode ``data_root(cfg.root, base) / cfg.folder``.

    Raises:
        ValueError: before any training, naming the path: no such folder or no ``train/`` or
            ``val/`` (with the layout expected and the ``prepare`` command), a split with
            loose files or no class folders, a class folder with no images, train and val
            classes that differ, unreadable images (at ``cfg.check``), a bad ``classes.tsv``.
    """
    folder = data_root(cfg.root, base) / cfg.folder
    if not folder.is_dir():
        raise layout_error(folder, f"no ImageNet folder {folder}")
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            raise layout_error(folder, f"{folder} has no {split}/ folder")
    train = scan_image_folder(folder / "train", cfg.max_per_class)
    val = scan_image_folder(folder / "val", cfg.max_per_class)
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"{folder}: train and val classes differ: only in train/ {only_t[:10]}"
                         f"{' ...' if len(only_t) > 10 else ''} ({len(only_t)}), only in val/ {only_v[:10]}"
                         f"{' ...' if len(only_v) > 10 else ''} ({len(only_v)})")
    tsv = folder / CLASSES_FILE
    names = read_class_names(tsv, train.classes) if tsv.is_file() else train.classes
    for split in (train, val):
        check_images(split, cfg.check, cfg.workers)
    data = ImageNetData(cfg, folder, train, val, names)
    if cfg.preload:
        data.train_images = preload_images(train, cfg.preload_size, cfg.workers)
        data.val_images = preload_images(val, cfg.preload_size, cfg.workers)
    return data
