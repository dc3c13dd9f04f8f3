"""CIFAR-10 in its standard "python version" layout, and its augmentation on tensors.

The data root (a parameter, else ``$DEQLIB_DATA``, else the repository's ``data/``) holds
``cifar-10-batches-py/`` with the pickled batches ``data_batch_1..5`` and ``test_batch``. When
that folder is absent the archive is downloaded from the canonical source, its published MD5
checked, and extracted atomically.
Any folder in the same layout works, e.g. the shared slice of 5085 / 1017 real images: the
number of images is the length of each batch's ``labels``, never ``num_cases_per_batch``.

Augmentation (random crop with 4-pixel zero padding, horizontal flip) and normalization run on
batches of tensors and draw from a ``torch.Generator``, so they are reproducible under the
training loop's per-step seeding (``TensorBatches(..., transform=CifarTransform(...))``).
"""

from __future__ import annotations

import io
import numbers
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checks import check_bool, check_int, check_str
from .download import data_root, download, extract

__all__ = [
    "CIFAR_URL",
    "CIFAR_MD5",
    "CIFAR_FOLDER",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CifarDataConfig",
    "Cifar10",
    "fetch_cifar10",
    "load_cifar10",
    "random_crop_flip",
    "normalize",
    "CifarTransform",
]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the CIFAR page
CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# Per-channel statistics of the full training set (the values the MDEQ code normalizes with).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class CifarDataConfig:
    """Where the images are and how the training batches are augmented.

    Attributes:
        root: data root holding ``cifar-10-batches-py/`` ("" means ``$DEQLIB_DATA`` if set, else
            ``data/`` beside ``params.yaml``); a relative path is resolved against the folder of
            ``params.yaml``.
        download: fetch the archive when the folder is absent (else a clear error).
        augment: random crop (``pad`` pixels) and horizontal flip of the training batches.
        pad: crop padding in pixels.
        n_train, n_test: use only the first this many images of each split (None: all), for
            smoke runs; the small profile uses the whole slice.
    """

    root: str = ""
    download: bool = True
    augment: bool = True
    pad: int = 4
    n_train: int | None = None
    n_test: int | None = None

    def __post_init__(self) -> None:
        check_str("root", self.root)
        for name in ("download", "augment"):
            check_bool(name, getattr(self, name))
        check_int("pad", self.pad, 0, 16)
        for name in ("n_train", "n_test"):
            check_int(name, getattr(self, name), 1, optional=True)


@dataclass
class Cifar10:
    """The images as ``uint8 (N, 3, 32, 32)`` and labels as ``int64 (N,)``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches and nothing else: only the numpy globals an array needs
    may be loaded, so a stray file in the data root cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_pickle(path: Path, keys: tuple[str, ...]) -> dict:
    """The dict pickled in ``path``; ValueError naming the file if it is not one holding
    ``keys`` (truncated, another format, a class it may not load)."""
    try:
        with open(path, "rb") as fh:
            raw = _ArrayUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python pickle ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a CIFAR-10 batch dict")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{path} has no {missing} (keys: {sorted(map(str, d))})")
    return d


def _read_labels(path: Path, labels: object) -> Tensor:
    """``labels`` as int64 ``(n,)``; ValueError naming the file and the first label that is not
    an integer. ``torch.tensor(..., dtype=int64)`` would truncate 2.5 to 2, read True as 1 and
    a bytes label as a row of its byte values, and fail on a string with no file named."""
    try:
        values = list(labels)
    except TypeError as err:
        raise ValueError(f"{path}: labels must be a sequence of integers, got {labels!r} "
                         f"({type(labels).__name__})") from err
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # numpy ints are Integral
            raise ValueError(f"{path}: labels must be integers, got {v!r} ({type(v).__name__}) at {i}")
    try:
        return torch.tensor([int(v) for v in values], dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError) as err:  # beyond int64
        raise ValueError(f"{path}: labels out of the int64 range ({err})") from err


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One batch file -> ``(uint8 (n, 3, 32, 32), int64 (n,))`` with ``n = len(labels)``."""
    d = _read_pickle(path, ("data", "labels"))
    labels = _read_labels(path, d["labels"])
    dtype = getattr(d["data"], "dtype", None)
    try:
        data = torch.as_tensor(d["data"])
    except (TypeError, ValueError, RuntimeError) as err:  # object or string arrays, ragged lists
        what = f"an array of {dtype}" if dtype is not None else f"a {type(d['data']).__name__}"
        raise ValueError(f"{path}: pixel data is {what}, expected uint8 (0..255)") from err
    if data.dtype != torch.uint8:  # a cast would wrap 300 to 44 and floor 0.5 to 0
        raise ValueError(f"{path}: pixel data is {data.dtype}, expected uint8 (0..255)")
    n = len(labels)
    if data.shape != (n, 3072):
        raise ValueError(f"{path}: data has shape {tuple(data.shape)}, expected ({n}, 3072) for its "
                         f"{n} labels")
    return data.reshape(n, 3, 32, 32).contiguous(), labels


def fetch_cifar10(root: str | Path, url: str = CIFAR_URL, md5: str = CIFAR_MD5) -> Path:
    """Download ``url`` (checked against ``md5``) into ``root`` and extract it, unless
    ``root/cifar-10-batches-py`` is there; returns that folder. The archive stays in ``root``
    (a second extraction needs no network). Raises DownloadError naming the URL."""
    folder = Path(root) / CIFAR_FOLDER
    if not folder.is_dir():
        archive = download(url, folder.parent / Path(url).name, md5, algorithm="md5")
        extract(archive, folder.parent, CIFAR_FOLDER)
    return folder


def load_cifar10(
    root: str | Path | None = None,
    base: str | Path | None = None,
    download_missing: bool = True,
    url: str = CIFAR_URL,
    md5: str = CIFAR_MD5,
) -> Cifar10:
    """Read CIFAR-10 from ``root/cifar-10-batches-py``, downloading it there first if absent.

    Args:
        root: the data root (see :func:`deqlib.data.download.data_root`); base: folder a relative
            root is resolved against.
        download_missing: when the folder is absent, fetch ``url`` (checked against ``md5``) and
            extract it; when False, raise FileNotFoundError naming the folder.
    Raises:
        DownloadError: offline, or the archive's checksum differs.
    """
    folder = data_root(root, base) / CIFAR_FOLDER
    if not folder.is_dir():
        if not download_missing:
            raise FileNotFoundError(f"no CIFAR-10 at {folder} and download is off")
        fetch_cifar10(folder.parent, url, md5)
    missing = [name for name in (*TRAIN_FILES, TEST_FILE, "batches.meta") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: not the CIFAR-10 python layout")
    parts = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_x, test_y = _read_batch(folder / TEST_FILE)
    meta = _read_pickle(folder / "batches.meta", ("label_names",))
    classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in meta["label_names"])
    train_y = torch.cat([p[1] for p in parts])
    for name, y in (("train", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise ValueError(f"{folder}: {name} labels outside 0..{len(classes) - 1}")
    return Cifar10(torch.cat([p[0] for p in parts]), train_y, test_x, test_y, classes)


def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random ``H x W`` crop of the zero-padded images and a horizontal flip with probability 1/2.

    Args:
        x: ``(B, C, H, W)`` images (any dtype). generator: source of the offsets and flips.
        pad: padding on every side; each image is shifted by ``(dy, dx)`` in ``[-pad, pad]``.
    Returns:
        ``(B, C, H, W)``, same dtype.
    """
    B, C, H, W = x.shape
    off = torch.randint(0, 2 * pad + 1, (2, B), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = off[0].view(B, 1, 1) + torch.arange(H).view(1, H, 1)  # (B, H, 1)
    cols = off[1].view(B, 1, 1) + torch.arange(W).view(1, 1, W)  # (B, 1, W)
    cols = torch.where(flip.view(B, 1, 1), cols.flip(-1), cols)  # flipping = reading right to left
    b = torch.arange(B).view(B, 1, 1)
    # Advanced indexing on dims 0, 2, 3 moves the channel dim last: (B, H, W, C).
    return padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2).contiguous()


def normalize(x: Tensor) -> Tensor:
    """``uint8 (B, 3, H, W)`` in 0..255 -> float32 standardized per channel."""
    # float32 whatever torch's default dtype is, so the inputs never change with it
    mean = torch.tensor(CIFAR_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


class CifarTransform:
    """``(images uint8, labels), generator -> (float images, labels)`` for ``TensorBatches``.

    With ``augment`` the images are randomly cropped and flipped (before normalization, so the
    padding is black, as in the usual pipeline); they are always normalized.
    """

    def __init__(self, augment: bool, pad: int = 4):
        self.augment, self.pad = bool(augment), int(pad)

    def __call__(self, batch: tuple[Tensor, ...], generator: torch.Generator) -> tuple[Tensor, ...]:
        x, *rest = batch
        if self.augment:
            x = random_crop_flip(x, generator, self.pad)
        return (normalize(x), *rest)
