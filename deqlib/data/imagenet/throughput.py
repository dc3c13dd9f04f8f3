"""The loader's decode + transform throughput (:func:`measure_throughput`, to size the
workers) and the command line ``python -m deqlib.data.imagenet prepare|throughput``."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from ...checks import check_choice, check_int
from .batches import ImageDataset, PreloadDataset
from .folder import layout_error, scan_image_folder
from .prepare import prepare_imagenet
from .transforms import EvalTransform, TrainTransform

__all__ = ["measure_throughput", "main"]

# The package docstring's first paragraph, the command line's description.
DESCRIPTION = "ImageNet (ILSVRC-2012) in the ImageFolder layout: index, checks, transforms, batches, prepare."


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
        raise layout_error(Path(folder), f"{Path(folder)} has no {split}/ folder")
    index = scan_image_folder(path)
    if mode == "preload":
        ds: torch.utils.data.Dataset = PreloadDataset(index, size)
    else:
        tf = TrainTransform(size, (0.08, 1.0), True, 0) if mode == "train" else EvalTransform(round(size * 8 / 7), size)
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


def main(argv: list[str] | None = None) -> int:
    """``prepare`` the layout from the official archives; measure the decode ``throughput``."""
    parser = argparse.ArgumentParser(prog="python -m deqlib.data.imagenet", description=DESCRIPTION)
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
