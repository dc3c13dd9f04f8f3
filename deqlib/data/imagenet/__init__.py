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

Modules: :mod:`~deqlib.data.imagenet.config` (the config, shared constants),
:mod:`~deqlib.data.imagenet.folder` (a split's index, the layout error, class names),
:mod:`~deqlib.data.imagenet.checks` (the image checks), :mod:`~deqlib.data.imagenet.transforms`
(decoding, crops, normalization), :mod:`~deqlib.data.imagenet.batches` (datasets, prefetching
loader, batches, preload), :mod:`~deqlib.data.imagenet.load` (:func:`load_imagenet`),
:mod:`~deqlib.data.imagenet.throughput` (the throughput and the command line),
:mod:`~deqlib.data.imagenet.prepare` (the layout from the official archives).
"""

from .batches import ImageDataset, ImageNetBatches, ImageNetEval, PreloadDataset, preload_images
from .checks import check_images
from .config import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataConfig
from .folder import ImageFolder, scan_image_folder
from .load import ImageNetData, load_imagenet
from .prepare import ILSVRC_MD5, prepare_imagenet
from .throughput import main, measure_throughput
from .transforms import (
    EvalTransform,
    TrainTransform,
    center_crop_box,
    eval_transform,
    load_rgb,
    normalize,
    random_resized_crop_box,
    train_transform,
)

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
    "PreloadDataset",
    "TrainTransform",
    "EvalTransform",
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
    "main",
]
