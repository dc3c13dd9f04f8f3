"""ImageNet (ILSVRC-2012) in the ImageFolder layout: index, checks, transforms, batches, prepare.

Layout (the one ImageNet users already have, and torchvision's ``ImageFolder``)::

    <folder>/train/<wnid>/*.JPEG
    <folder>/val/<wnid>/*.JPEG
    <folder>/classes.tsv          optional: wnid, ImageNet-1k index, name (a header line first)

``<folder>`` is ``data_root(root, base) / folder`` (a parameter, else ``$DEQLIB_DATA``, as
:func:`deqlib.data.download.data_root` reads it; a relative root resolved against ``base``, the
folder of ``params.yaml``). Classes are numbered by sorted WordNet id; greyscale, CMYK and
palette images are converted to RGB. The shared 10-class slice ``imagenette-slice`` is read as
it is. ``python -m deqlib.data.imagenet prepare``
makes the layout from the official archives (:mod:`deqlib.data.imagenet.prepare`; no network:
they need an image-net.org account).

Checks, all before any training (each a ValueError naming the path): the folder, ``train/``
and ``val/`` exist; every class folder holds images; train and val have the same classes;
and every image passes the ``check`` level:

* ``"header"`` (default): the file opens as an image (Pillow parses the header: format, size,
  mode) and a JPEG's last KiB holds its end-of-image marker, which catches the usual damage,
  a file cut short; a file that fails the marker test (or is not a JPEG) is decoded in full
  before it is called bad, so trailing bytes after the marker are no false alarm. About two
  small reads per file: ~9,000 files/s on one core from a warm cache (the slice), so ImageNet's
  1.33 M files take about 2.5 core-minutes, spread over the loader workers (a cold disk is
  slower). ``PIL.Image.verify()`` would add nothing: for JPEG it checks no more than opening.
* ``"decode"``: every image decoded once (~1,800 files/s per core on the slice's 224 px JPEGs;
  for ImageNet about a training epoch's decoding).
* ``"list"``: only the listing (non-empty files); damage then surfaces when a worker decodes
  the file, as a ValueError naming it.

Transforms (as the MDEQ ImageNet code, torchvision's defaults): training takes a random-resized
crop (area fraction in ``scale``, aspect ratio in ``[3/4, 4/3]`` log-uniform, 10 tries, then a
centre crop of the clamped ratio) resized to ``train_size``, and a horizontal flip with
probability 1/2; evaluation resizes the short side to ``eval_resize`` and takes the centre
``eval_size`` square. Both are one Pillow ``resize(..., box=...)`` call with the bilinear
filter: bilinear is the reference pipeline's filter (and cheaper than bicubic), and resizing
only the box equals resizing the whole image and cropping, pixel for pixel (tested).
Normalization uses the ImageNet mean and std. Each example's draws come from a generator
seeded by ``(seed, epoch, index)``, so a batch is the same whatever the number of loader
workers or processes.

Two ways to serve batches (both objects have the training loop's ``batch(epoch, i, rank,
world)`` and ``steps_per_epoch``):

* decoding in ``DataLoader`` worker processes (``workers``): no memory beyond the prefetched
  batches, full resolution; costs ``batch_size / (step time x per-core throughput)`` cores
  (``python -m deqlib.data.imagenet throughput`` measures the throughput).
* ``preload=True``: every image decoded once (JPEG draft mode, short side to
  ``preload_size``, centre square) into a ``uint8 (N, 3, s, s)`` tensor: ``3 s^2`` bytes an
  image (2,500 images at 64: 31 MB; at 224: 376 MB; ImageNet's 1.28 M at 64: 15.7 GB) and one
  decoding pass up front, then only small crops per step; the random crops then come from the
  reduced, squared image.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...checks import check_bool, check_choice, check_int, check_real_list, check_str
from ..download import data_root
from .prepare import CLASSES_FILE, ILSVRC_MD5, PREPARE_COMMAND, prepare_imagenet

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ILSVRC_MD5",
    "ImageNetDataConfig",
    "ImageFolder",
    "ImageNetData",
    "ImageNetBatches",
    "ImageNetEval",
    "ImageDataset",
    "load_imagenet",
    "scan_image_folder",
    "check_images",
    "load_rgb",
    "random_resized_crop_box",
    "center_crop_box",
    "train_transform",
    "eval_transform",
    "normalize",
    "preload_images",
    "measure_throughput",
    "prepare_imagenet",
]

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
            ``"decode"`` (see the module docstring).
        preload: decode every image once into memory at ``preload_size`` (see the module
            docstring for the costs).
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


# ---------------------------------------------------------------------------------------------
# The index of a folder and its checks


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


def _layout_error(folder: Path, what: str) -> ValueError:
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
    the module docstring), over ``workers`` loader processes.

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


def _read_class_names(path: Path, classes: Sequence[str]) -> tuple[str, ...]:
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


# ---------------------------------------------------------------------------------------------
# Transforms


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` to an RGB image (greyscale, CMYK, palette converted). Raises ValueError
    naming the file when it cannot be decoded (cut short, not an image)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode {path}: {type(err).__name__}: {err}") from err


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator) -> tuple[int, int, int, int]:
    """The random-resized crop's box ``(left, top, w, h)`` in a ``width x height`` image.

    Up to 10 tries: area ``width * height * U(scale)``, aspect ``w / h = exp(U(log ratio))``,
    ``w, h`` rounded; the first that fits is placed uniformly. If none fits, the centre crop
    of the largest box whose aspect is ``ratio`` clamped (torchvision's RandomResizedCrop).
    """
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(lo + (hi - lo) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, resize: int, size: int) -> tuple[float, float, float, float]:
    """The source box ``(left, top, right, bottom)`` of "resize the short side to ``resize``
    (the long side ``int(resize * long / short)``), then crop the centre ``size`` square" (the
    crop's offsets ``round((new - size) / 2)``), in the original image's pixels."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def _to_tensor(img: Image.Image) -> Tensor:
    """RGB image -> ``uint8 (3, H, W)``."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def train_transform(img: Image.Image, size: int, scale: tuple[float, float], flip: bool,
                    generator: torch.Generator, ratio: tuple[float, float] = RATIO) -> Tensor:
    """Random-resized crop to ``size x size`` (bilinear), then a flip with probability 1/2 if
    ``flip``. ``img``: an RGB image. Returns ``uint8 (3, size, size)``."""
    left, top, w, h = random_resized_crop_box(img.width, img.height, scale, ratio, generator)
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if flip and float(torch.rand(1, generator=generator)) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_tensor(out)


def eval_transform(img: Image.Image, resize: int, size: int) -> Tensor:
    """Short side to ``resize``, centre ``size`` square (bilinear). Returns ``uint8 (3, size, size)``."""
    box = center_crop_box(img.width, img.height, resize, size)
    return _to_tensor(img.resize((size, size), Image.Resampling.BILINEAR, box=box))


def normalize(x: Tensor) -> Tensor:
    """``uint8 (B, 3, H, W)`` in 0..255 -> float32 standardized with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _seed(*key: int) -> int:
    """A seed from a tuple of ints, stable across runs, processes and platforms."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return seed


# ---------------------------------------------------------------------------------------------
# Datasets and batches


@dataclass(frozen=True)
class _Train:
    size: int
    scale: tuple[float, float]
    flip: bool
    seed: int

    def __call__(self, img: Image.Image, epoch: int, index: int) -> Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, index))
        return train_transform(img, self.size, self.scale, self.flip, g)


@dataclass(frozen=True)
class _Eval:
    resize: int
    size: int

    def __call__(self, img: Image.Image, epoch: int, index: int) -> Tensor:
        return eval_transform(img, self.resize, self.size)


class ImageDataset(torch.utils.data.Dataset):
    """One image decoded and transformed per item, in a loader worker.

    ``source``: an :class:`ImageFolder` (decode the file) or a preloaded ``uint8 (N, 3, s, s)``
    tensor; ``labels``: ``(N,)``. ``dataset[(epoch, index)]`` (or ``dataset[index]``, epoch 0)
    is ``(uint8 (3, S, S), label)``; ``transform(img, epoch, index)`` draws from a generator
    seeded by ``(seed, epoch, index)``, so the item does not depend on which worker makes it.
    """

    def __init__(self, source: ImageFolder | Tensor, labels: np.ndarray | Tensor,
                 transform: Callable[[Image.Image, int, int], Tensor]):
        self.source, self.labels, self.transform = source, torch.as_tensor(labels, dtype=torch.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        if isinstance(self.source, Tensor):
            return Image.fromarray(self.source[index].permute(1, 2, 0).numpy())
        return load_rgb(self.source.path(index))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.transform(self.image(index), epoch, index), self.labels[index]


class _BatchPlan:
    """A batch sampler over a generator of ``(key, items)`` that records each batch's key as
    the loader takes it, and looks one batch ahead: :meth:`next_key` is the key of the batch
    the loader delivers next (also with no workers, where nothing is queued)."""

    def __init__(self, plan: Iterator[tuple[Any, list]]):
        self.plan, self.keys = plan, collections.deque()
        self.ahead = next(self.plan, None)

    def __iter__(self) -> Iterator[list]:
        while self.ahead is not None:
            key, items = self.ahead
            self.ahead = next(self.plan, None)
            self.keys.append(key)
            yield items

    def next_key(self) -> Any:
        if self.keys:
            return self.keys[0]
        return None if self.ahead is None else self.ahead[0]


class _Prefetcher:
    """Batches served in order from a ``DataLoader`` (its workers decode ahead); a request out
    of order (a resumed run, another stride) restarts the loader from there."""

    def __init__(self, dataset: torch.utils.data.Dataset, workers: int):
        self.dataset, self.workers = dataset, workers
        self._it: Iterator | None = None
        self._plan: _BatchPlan | None = None
        self._last: tuple[Any, Any] | None = None
        self.restarts = 0  # how many loaders were started (a test's window into the caching)

    def get(self, key: Any, plan: Callable[[], Iterator[tuple[Any, list]]]) -> Any:
        if self._last is not None and self._last[0] == key:  # asked again (inputs, then labels)
            return self._last[1]
        if self._it is None or key != self._plan.next_key():
            self.close()
            self._plan = _BatchPlan(plan())
            self._it = iter(torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._plan, num_workers=self.workers,
                prefetch_factor=2 if self.workers else None))
            self.restarts += 1
        batch = next(self._it)
        got = self._plan.keys.popleft()
        if got != key:  # the plan began elsewhere than asked: a bug here, not bad input
            raise RuntimeError(f"batch plan out of step: asked for {key}, the loader made {got}")
        self._last = (key, batch)
        return batch

    def close(self) -> None:
        """Stop the workers now (they would otherwise run until the iterator is collected)."""
        it, self._it, self._plan, self._last = self._it, None, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


class ImageNetBatches:
    """Shuffled training batches for :func:`deqlib.train.train`, decoded by loader workers.

    ``batch(epoch, i, rank, world)`` is ``(x float32 (B / world, 3, S, S) normalized,
    y int64 (B / world,))``: this process's share ``rank::world`` of the ``i``-th batch of
    ``epoch``'s permutation (seeded by ``(seed, epoch)``); ``steps_per_epoch = N // B`` (the
    ragged last batch is dropped). Consecutive calls are served from batches the workers made
    ahead, across epochs; any other call (a resume) restarts the loader at that step.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int = 0, workers: int = 0):
        check_int("batch_size", batch_size, 1, len(dataset))
        check_int("seed", seed, 0)
        check_int("workers", workers, 0, 256)
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.steps_per_epoch = len(dataset) // batch_size
        self._prefetch = _Prefetcher(dataset, workers)
        self._share: tuple[int, int] | None = None

    def _plan(self, epoch: int, i: int, rank: int, world: int) -> Iterator[tuple[tuple[int, int], list]]:
        n, b = len(self.dataset), self.batch_size
        while True:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.seed, epoch))).tolist()
            for step in range(i, self.steps_per_epoch):
                yield (epoch, step), [(epoch, j) for j in perm[step * b:(step + 1) * b][rank::world]]
            epoch, i = epoch + 1, 0

    def batch(self, epoch: int, i: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        check_int("epoch", epoch, 0)
        check_int("i", i, 0, self.steps_per_epoch - 1)
        check_int("world", world, 1)
        check_int("rank", rank, 0, world - 1)
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by world={world} processes")
        if (rank, world) != self._share:
            self._prefetch.close()  # another share: the queued batches are someone else's
            self._share = (rank, world)
        x, y = self._prefetch.get((epoch, i), lambda: self._plan(epoch, i, rank, world))
        return normalize(x), y

    def close(self) -> None:
        self._prefetch.close()

    def __del__(self) -> None:
        if hasattr(self, "_prefetch"):  # not when __init__ refused its arguments
            self.close()


class ImageNetEval:
    """Evaluation batches for :func:`deqlib.train.evaluate`: ``batch(start, stop)`` is
    ``(x float32 (stop - start, 3, S, S) normalized, y int64 (stop - start,))``, the items
    ``[start, stop)`` in folder order, centre-cropped. ``n_items`` is the number of images.

    Workers decode ahead along the stride the calls follow (``evaluate`` asks process ``r`` of
    ``w`` for batches ``r, r + w, ...``: the stride is learnt from the first two calls).
    """

    def __init__(self, dataset: ImageDataset, workers: int = 0):
        check_int("workers", workers, 0, 256)
        self.dataset, self.n_items = dataset, len(dataset)
        self._prefetch = _Prefetcher(dataset, workers)
        self._last: tuple[int, int] | None = None

    def _plan(self, start: int, size: int, stride: int) -> Iterator[tuple[tuple[int, int], list]]:
        for s in range(start, self.n_items, size * stride):
            stop = min(s + size, self.n_items)
            yield (s, stop), list(range(s, stop))

    def batch(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        check_int("start", start, 0, self.n_items - 1)
        check_int("stop", stop, start + 1, self.n_items)
        size, stride = stop - start, 1
        last = self._last
        if last is not None and last[1] - last[0] == size and start > last[0] and (start - last[0]) % size == 0:
            stride = (start - last[0]) // size
        self._last = (start, stop)
        x, y = self._prefetch.get((start, stop), lambda: self._plan(start, size, stride))
        return normalize(x), y

    def close(self) -> None:
        self._prefetch.close()

    def __del__(self) -> None:
        if hasattr(self, "_prefetch"):  # not when __init__ refused its arguments
            self.close()


class _Preload(torch.utils.data.Dataset):
    def __init__(self, split: ImageFolder, size: int):
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Tensor:
        path = self.split.path(index)
        try:
            with Image.open(path) as im:
                # JPEG draft mode: the decoder scales by 1/2, 1/4 or 1/8 in the DCT as long as
                # the short side stays >= size, several times cheaper than a full decode.
                s = self.size / min(im.size)
                im.draft("RGB", (math.ceil(im.width * s), math.ceil(im.height * s)))
                img = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot decode {path}: {type(err).__name__}: {err}") from err
        return eval_transform(img, self.size, self.size)


def preload_images(split: ImageFolder, size: int, workers: int = 0) -> Tensor:
    """Every image of ``split``, short side resized to ``size`` and centre square cropped:
    ``uint8 (N, 3, size, size)``, decoded over ``workers`` loader processes."""
    check_int("size", size, 1, 4096)
    check_int("workers", workers, 0, 256)
    out = torch.empty((len(split), 3, size, size), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(_Preload(split, size), batch_size=64, num_workers=workers)
    n = 0
    for x in loader:
        out[n:n + len(x)] = x
        n += len(x)
    return out


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
        ds = ImageDataset(source, self.train.labels, _Train(c.train_size, c.scale, c.flip, seed))
        return ImageNetBatches(ds, batch_size, seed, c.workers)

    def eval_batches(self) -> ImageNetEval:
        """The validation split, resized and centre-cropped, for ``evaluate``."""
        c = self.cfg
        source = self.val if self.val_images is None else self.val_images
        return ImageNetEval(ImageDataset(source, self.val.labels, _Eval(c.eval_resize, c.eval_size)), c.workers)


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
        raise _layout_error(folder, f"no ImageNet folder {folder}")
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            raise _layout_error(folder, f"{folder} has no {split}/ folder")
    train = scan_image_folder(folder / "train", cfg.max_per_class)
    val = scan_image_folder(folder / "val", cfg.max_per_class)
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"{folder}: train and val classes differ: only in train/ {only_t[:10]}"
                         f"{' ...' if len(only_t) > 10 else ''} ({len(only_t)}), only in val/ {only_v[:10]}"
                         f"{' ...' if len(only_v) > 10 else ''} ({len(only_v)})")
    tsv = folder / CLASSES_FILE
    names = _read_class_names(tsv, train.classes) if tsv.is_file() else train.classes
    for split in (train, val):
        check_images(split, cfg.check, cfg.workers)
    data = ImageNetData(cfg, folder, train, val, names)
    if cfg.preload:
        data.train_images = preload_images(train, cfg.preload_size, cfg.workers)
        data.val_images = preload_images(val, cfg.preload_size, cfg.workers)
    return data


# ---------------------------------------------------------------------------------------------
# Throughput


def measure_throughput(folder: str | os.PathLike, workers: int, mode: str = "train", size: int = 224,
                       images: int = 512, batch_size: int = 32, split: str = "train") -> dict[str, float]:
    """Decode + transform throughput of ``folder/split`` over ``workers`` loader processes.

    ``mode``: ``"train"`` (random-resized crop and flip to ``size``), ``"eval"`` (short side to
    ``size * 8 / 7``, centre ``size``), ``"preload"`` (draft decode, short side to ``size``,
    centre square). The first ``images`` files (cycled if fewer) in ``batch_size`` batches;
    the clock starts when the first batch arrives, so worker start-up is not counted.
    Returns ``{"images", "seconds", "images_per_s", "per_core", "workers"}``; ``per_core`` is
    ``images_per_s / max(workers, 1)``.
    """
    check_int("workers", workers, 0, 256)
    check_choice("mode", mode, ("train", "eval", "preload"))
    check_int("size", size, 1, 4096)
    check_int("images", images, 1)
    check_int("batch_size", batch_size, 1)
    check_choice("split", split, ("train", "val"))
    path = Path(folder) / split
    if not path.is_dir():
        raise _layout_error(Path(folder), f"{Path(folder)} has no {split}/ folder")
    index = scan_image_folder(path)
    if mode == "preload":
        ds: torch.utils.data.Dataset = _Preload(index, size)
    else:
        tf = _Train(size, (0.08, 1.0), True, 0) if mode == "train" else _Eval(round(size * 8 / 7), size)
        ds = ImageDataset(index, index.labels, tf)
    order = [i % len(index) for i in range(images + batch_size)]  # one extra batch: the warm-up
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=batch_size,
                                         num_workers=workers)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch[0] if isinstance(batch, (list, tuple)) else batch)
    seconds = time.perf_counter() - t0
    rate = n / seconds
    return {"images": n, "seconds": seconds, "images_per_s": rate, "per_core": rate / max(workers, 1),
            "workers": workers}


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """``prepare`` the layout from the official archives; measure the decode ``throughput``."""
    parser = argparse.ArgumentParser(prog="python -m deqlib.data.imagenet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="the ImageFolder layout from the official ILSVRC-2012 archives")
    p.add_argument("--train-tar", required=True, help="ILSVRC2012_img_train.tar")
    p.add_argument("--val-tar", required=True, help="ILSVRC2012_img_val.tar")
    p.add_argument("--devkit", required=True, help="ILSVRC2012_devkit_t12.tar.gz")
    p.add_argument("--out", required=True, help="the folder to make (holding train/ and val/)")
    t = sub.add_parser("throughput", help="decode + transform images/s per core, to size the loader workers")
    t.add_argument("--root", required=True, help="the folder holding train/ (and val/)")
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--mode", choices=["train", "eval", "preload"], default="train")
    t.add_argument("--size", type=int, default=224, help="crop side (preload: the stored side)")
    t.add_argument("--images", type=int, default=512)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--split", choices=["train", "val"], default="train")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        try:
            out = prepare_imagenet(args.train_tar, args.val_tar, args.devkit, args.out)
        except ValueError as err:
            p.error(" ".join(str(err).split()))
        print(f"wrote {out}")
        return 0
    try:
        r = measure_throughput(args.root, args.workers, args.mode, args.size, args.images, args.batch, args.split)
    except ValueError as err:
        t.error(" ".join(str(err).split()))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.mode} {args.size}px, {r['workers']} worker(s) on {cores} core(s): {r['images_per_s']:.0f} images/s, "
          f"{r['per_core']:.0f} images/s per worker ({r['images']} images in {r['seconds']:.2f} s)")
    return 0

