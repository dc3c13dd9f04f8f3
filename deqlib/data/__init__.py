"""Data sets: the 1D synthetic target; download helpers shared by the real data sets."""

from .download import DATA_ENV, DEFAULT_DATA_DIR, DownloadError, data_root, download, extract
from .synthetic import SyntheticConfig, make_synthetic, target_function
from .cifar import Cifar10, CifarDataConfig, load_cifar10

from .wikitext import LMStream, Vocabulary, WikiTextData, batchify, load_wikitext
from .imagenet import ImageNetBatches, ImageNetData, ImageNetDataConfig, ImageNetEval, load_imagenet, prepare_imagenet

__all__ = [
    "DATA_ENV", "DEFAULT_DATA_DIR", "DownloadError", "data_root", "download", "extract",
    "SyntheticConfig", "make_synthetic", "target_function",
    "Cifar10", "CifarDataConfig", "load_cifar10",
    "LMStream", "Vocabulary", "WikiTextData", "batchify", "load_wikitext",
    "ImageNetBatches", "ImageNetData", "ImageNetDataConfig", "ImageNetEval", "load_imagenet", "prepare_imagenet",
]
