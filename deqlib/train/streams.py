"""The random streams of a run, and mini-batches drawn from them.

Every random draw of a run comes from a generator seeded by a tuple of integers, so that a run
resumed at step ``k`` draws what the uninterrupted run drew, and each process of a
data-parallel run draws its own where it must. The streams, by name:

- :func:`order_rng` ``(seed, epoch)``: the permutation of the training set in an epoch;
- :func:`augment_rng` ``(seed, epoch, batch)``: the augmentation of a global batch;
- :func:`step_rng` ``(seed, step, rank)``: what the model draws through torch's global generator
  during a step (dropout masks), one per process;
- :func:`penalty_rng` ``(seed, step)``: the Bernoulli draw of the Jacobian penalty, the same on
  every process; with ``rank``, that process's own probes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["rng", "order_rng", "augment_rng", "step_rng", "penalty_rng", "TensorBatches"]

# The last element of a step stream's key (kept as the numbers the runs were made with).
_AUGMENT, _STEP, _PENALTY = 1, 2, 3


def rng(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (stable across runs and processes)."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _per_rank(key: tuple[int, ...], rank: int) -> torch.Generator:
    # Process 0 draws what a single-process run draws; every other process its own.
    return rng(*key) if rank == 0 else rng(*key, rank)


def order_rng(seed: int, epoch: int) -> torch.Generator:
    return rng(seed, epoch)


def augment_rng(seed: int, epoch: int, batch: int) -> torch.Generator:
    return rng(seed, epoch, batch, _AUGMENT)


def step_rng(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return _per_rank((seed, step, _STEP), rank)


def penalty_rng(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return _per_rank((seed, step, _PENALTY), rank)


class TensorBatches:
    """Shuffled mini-batches of aligned tensors, reproducible from ``(seed, epoch)``.

    ``tensors``: each ``(N, ...)``. ``batch(epoch, i, rank, world)`` is the ``i``-th batch of
    ``epoch``, this process's share of it. ``transform(batch, generator)`` may augment.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        batch_size: int,
        seed: int = 0,
        transform: Callable[[tuple[Tensor, ...], torch.Generator], tuple[Tensor, ...]] | None = None,
    ):
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"tensors differ in length: {[t.shape[0] for t in tensors]}")
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} examples")
        self.tensors, self.batch_size, self.seed, self.transform = tuple(tensors), batch_size, seed, transform
        self.steps_per_epoch = n // batch_size  # drop the ragged last batch

    def batch(self, epoch: int, i: int, rank: int = 0, world: int = 1) -> tuple[Tensor, ...]:
        perm = torch.randperm(self.tensors[0].shape[0], generator=order_rng(self.seed, epoch))
        idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
        out = tuple(t[idx] for t in self.tensors)
        if self.transform is not None:
            # The whole global batch, then this process's share: each example gets its own
            # draw (not the one its position in every share gets), whatever the process count.
            out = self.transform(out, augment_rng(self.seed, epoch, i))
        return tuple(t[rank::world] for t in out)
