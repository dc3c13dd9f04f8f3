"""Decoding and the transforms: the random-resized crop and flip of training, the resize and
centre crop of evaluation (one bilinear Pillow ``resize(..., box=...)`` each), normalization,
and the per-example transforms whose draws are seeded by ``(seed, epoch, index)``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import IMAGENET_MEAN, IMAGENET_STD, RATIO

__all__ = ["load_rgb", "random_resized_crop_box", "center_crop_box", "train_transform", "eval_transform",
           "normalize", "stable_seed", "TrainTransform", "EvalTransform"]


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


def stable_seed(*key: int) -> int:
    """A seed from a tuple of ints, stable across runs, processes and platforms."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return seed


@dataclass(frozen=True)
class TrainTransform:
    """:func:`train_transform` as an ``ImageDataset`` transform: ``(img, epoch, index) -> uint8
    (3, size, size)``, its draws from a generator seeded by ``(seed, epoch, index)``."""

    size: int
    scale: tuple[float, float]
    flip: bool
    seed: int

    def __call__(self, img: Image.Image, epoch: int, index: int) -> Tensor:
        g = torch.Generator().manual_seed(stable_seed(self.seed, epoch, index))
        return train_transform(img, self.size, self.scale, self.flip, g)


@dataclass(frozen=True)
class EvalTransform:
    """:func:`eval_transform` as an ``ImageDataset`` transform: ``(img, epoch, index) -> uint8
    (3, size, size)`` (no draws)."""

    resize: int
    size: int

    def __call__(self, img: Image.Image, epoch: int, index: int) -> Tensor:
        return eval_transform(img, self.resize, self.size)
