"""The configuration of :mod:`deqlib.data.imagenet` (:class:`ImageNetDataConfig`, validated on
construction) and the constants the other modules share: the ImageNet mean and std, the
random-resized crop's aspect range, the image suffixes, the check levels."""

from __future__ import annotations

from dataclasses import dataclass

from ...checks import check_bool, check_choice, check_int, check_real_list, check_str

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RATIO", "IMAGE_SUFFIXES", "CHECK_LEVELS", "ImageNetDataConfig"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # ImageNet's train set holds a PNG named .JPEG too
CHECK_LEVELS = ("list", "header", "decode")


@dataclass(frozen=True)
class ImageNetDataConfig:
    """Where the images are and how they are served.

    Attributes:
        root: data root, as :func:`deqlib.data.download.data_root` reads it ("" means
            ``$DEQLIB_DATA``); a relative path resolves against ``base``.
        folder: the data set's folder under the root (holding ``train/`` and ``val/``).
        train_size: side of the training crops. eval_size: side of the evaluation crops.
        eval_resize: the short side evaluation images are resized to before the centre crop.
        scale: ``(min, max)`` area fraction of the random-resized crop, in ``(0, 1]``.
        flip: random horizontal flips of the training images.
        workers: ``DataLoader`` worker processes decoding images (0: the main process).
        max_per_class: use only the first this many images (sorted names) of each class of
            each split, for smoke runs (None: all).
        check: how each image is checked before training: ``"list"``, ``"header"``,
            ``"decode"`` (see :mod:`deqlib.data.imagenet`).
        preload: decode every image once into memory at ``preload_size`` (see
            :mod:`deqlib.data.imagenet` for the costs).
    """

    root: str = ""
    folder: str = "imagenet"
    train_size: int = 224
    eval_size: int = 224
    eval_resize: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    workers: int = 4
    max_per_class: int | None = None
    check: str = "header"
    preload: bool = False
    preload_size: int = 64

    def __post_init__(self) -> None:
        check_str("root", self.root)
        check_str("folder", self.folder, nonempty=True)
        for name in ("train_size", "eval_resize", "preload_size"):
            check_int(name, getattr(self, name), 1, 4096)
        check_int("eval_size", self.eval_size, 1, self.eval_resize)  # the crop must fit
        check_real_list("scale", self.scale, minimum=0.0, maximum=1.0)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be a list of 2 numbers 0 < min <= max <= 1, got scale={self.scale!r}")
        object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))
        for name in ("flip", "preload"):
            check_bool(name, getattr(self, name))
        check_int("workers", self.workers, 0, 256)
        check_int("max_per_class", self.max_per_class, 1, optional=True)
        check_choice("check", self.check, CHECK_LEVELS)
