"""Which training examples each step and each training-loss estimate sees.

Two orders. ``book`` replays the book's run exactly: ``train_model_simple`` after
``torch.manual_seed(seed)`` with the chapter's loaders (``shuffle=True, drop_last=True`` for
training, no shuffle for validation, ``num_workers=0``). Every iteration of a ``DataLoader``
draws from the global RNG: one int64 for its workers' base seed when the iterator is made, and,
for a shuffled one, one more at the first batch to seed ``RandomSampler``'s permutation. The
book iterates its training loader once an epoch and again at every evaluation (the training-loss
estimate reads its first ``eval_iter`` batches, freshly shuffled), then the validation loader.
Replaying those draws on a private generator gives the same permutations without touching the
process's global RNG; they depend only on (seed, epoch, step), so a resumed run needs no state.

``seeded`` is the order before the book's was replayed: one permutation per epoch from
``seed * 1000 + epoch``, and the training-loss estimate on the first batches of the unshuffled split.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

DataOrderName = Literal["book", "seeded"]


class DataOrder(Protocol):
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches of training indices (``drop_last``)."""

    def estimate_batches(self, step: int) -> list[list[int]]:
        """The training batches of the loss estimate after 0-based ``step`` (an evaluation step)."""


def _batches(order: list[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    stop = len(order) - batch_size + 1 if drop_last else len(order)
    return [order[i : i + batch_size] for i in range(0, max(stop, 0), batch_size)]


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class BookOrder:
    """The book's batches: the global-RNG draws of its ``DataLoader`` iterations, replayed.

    Draw sequence after ``manual_seed(seed)``, per epoch: the training iterator (base seed,
    sampler seed), then at each 0-based global step ``s`` with ``s % eval_freq == 0`` the
    estimate's training iterator (base seed, sampler seed) and the validation iterator (base seed).
    Only the sampler seeds are kept; they are all drawn here (a few per evaluation, cheap) and the
    permutations made when asked for.
    """

    def __init__(self, n_train: int, batch_size: int, epochs: int, eval_freq: int, eval_iter: int, seed: int):
        self.n, self.batch_size, self.eval_iter = n_train, batch_size, eval_iter
        steps_per_epoch = n_train // batch_size
        rng = torch.Generator().manual_seed(seed)

        def draw() -> int:  # as _BaseDataLoaderIter and RandomSampler draw: one int64 from the generator
            return int(torch.empty((), dtype=torch.int64).random_(generator=rng).item())

        self.epoch_seeds: list[int] = []
        self.estimate_seeds: dict[int, int] = {}
        for epoch in range(epochs):
            draw()  # the training iterator's base seed
            self.epoch_seeds.append(draw())
            for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
                if step % eval_freq == 0:
                    draw()
                    self.estimate_seeds[step] = draw()
                    draw()  # the validation iterator's base seed

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return _batches(_permutation(self.n, self.epoch_seeds[epoch]), self.batch_size, drop_last=True)

    def estimate_batches(self, step: int) -> list[list[int]]:
        order = _permutation(self.n, self.estimate_seeds[step])
        return _batches(order, self.batch_size, drop_last=True)[: self.eval_iter]


class SeededOrder:
    """One permutation per epoch from ``seed * 1000 + epoch``; the estimate on the unshuffled split's first batches."""

    def __init__(self, n_train: int, batch_size: int, eval_iter: int, seed: int):
        self.n, self.batch_size, self.eval_iter, self.seed = n_train, batch_size, eval_iter, seed

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return _batches(_permutation(self.n, self.seed * 1000 + epoch), self.batch_size, drop_last=True)

    def estimate_batches(self, step: int) -> list[list[int]]:
        return _batches(list(range(self.n)), self.batch_size, drop_last=False)[: self.eval_iter]


def data_order(
    name: DataOrderName, n_train: int, batch_size: int, epochs: int, eval_freq: int, eval_iter: int, seed: int
) -> DataOrder:
    if name == "book":
        return BookOrder(n_train, batch_size, epochs, eval_freq, eval_iter, seed)
    return SeededOrder(n_train, batch_size, eval_iter, seed)
