"""Serving batches: :class:`ImageDataset` (one image decoded and transformed per item), the
loader that prefetches along a batch plan, :class:`ImageNetBatches` (training) and
:class:`ImageNetEval` (evaluation), and :func:`preload_images` (every image decoded once into
memory)."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...checks import check_int
from .folder import ImageFolder
from .transforms import eval_transform, load_rgb, normalize, stable_seed

__all__ = ["ImageDataset", "ImageNetBatches", "ImageNetEval", "PreloadDataset", "preload_images"]


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
        b = self.batch_size
        while True:
            perm = self.permutation(epoch)
            for step in range(i, self.steps_per_epoch):
                yield (epoch, step), [(epoch, j) for j in perm[step * b:(step + 1) * b][rank::world]]
            epoch, i = epoch + 1, 0

    def permutation(self, epoch: int) -> list[int]:
        """The order of the images in ``epoch`` (seeded by ``(seed, epoch)``; the same on every process)."""
        g = torch.Generator().manual_seed(stable_seed(self.seed, epoch))
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def indices(self, epoch: int, i: int, rank: int = 0, world: int = 1) -> list[int]:
        """The images (dataset indices) that ``batch(epoch, i, rank, world)`` serves, in order."""
        b = self.batch_size
        return self.permutation(epoch)[i * b:(i + 1) * b][rank::world]

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


class PreloadDataset(torch.utils.data.Dataset):
    """Item ``index`` of ``split`` draft-decoded, short side to ``size``, centre square: ``uint8
    (3, size, size)`` (what :func:`preload_images` stores)."""

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
    loader = torch.utils.data.DataLoader(PreloadDataset(split, size), batch_size=64, num_workers=workers)
    n = 0
    for x in loader:
        out[n:n + len(x)] = x
        n += len(x)
    return out
