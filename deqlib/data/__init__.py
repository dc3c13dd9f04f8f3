"""Data sets: the 1D synthetic target; download helpers shared by the real data sets."""

from .download import DATA_ENV, DownloadError, data_root, download, extract
from .synthetic import SyntheticConfig, make_synthetic, target_function
from .cifar import Cifar10, CifarDataConfig, load_cifar10

__all__ = ["DATA_ENV", "DownloadError", "data_root", "download", "extract", "SyntheticConfig", "make_synthetic", "target_function"]
__all__ += ["Cifar10", "CifarDataConfig", "load_cifar10"]
