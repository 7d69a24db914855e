"""Batches of a training run: ``torch.utils.data.DataLoader`` over a seeded batch sampler.

A run's batch at step ``s`` is a pure function of (seed, s): epoch ``e = s // S`` (``S``
steps per epoch) draws one permutation of the dataset from a generator seeded with
``derive_seed(seed, e, 0xBA7C4)``, and step ``s`` takes its slice ``[w B, (w + 1) B)``
(``w = s mod S``; the last batch of an epoch is smaller when ``B`` does not divide the
dataset). So a run resumed at step ``s`` (mid-epoch included) sees exactly the batches
an uninterrupted run sees from ``s`` on, whatever the number of loader workers.

Any map-style dataset works: items that are tuples ``(x, y)``, dicts (as HuggingFace
datasets give) or any nest of tensors, collated by ``collate_fn`` (torch's
``default_collate`` unless given: a tokenizer's padding collator such as transformers'
``DataCollatorWithPadding`` works unchanged). A ``DataLoader`` handed to
:func:`unpack_loader` gives its dataset, collate_fn and batch size; its own sampler is
replaced by this seeded one, so that the run can resume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

from edgetrain.seeding import derive_seed, make_generator

__all__ = ["BatchSampler", "unpack_loader"]

_EPOCH_STREAM = 0xBA7C4
_WORKER_STREAM = 0xDA7A


class BatchSampler(Sampler[list[int]]):
    """Step -> the indices (and the collated batch) of that step; see the module doc.

    Iterating yields the index lists of steps ``start, start + 1, ...`` (``stop``
    exclusive, or forever), which is what ``DataLoader(batch_sampler=...)`` reads.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        seed: int,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.data = data
        self.n = len(data)
        if self.n == 0:
            raise ValueError("Cannot draw batches from an empty dataset")
        self.batch_size = min(int(batch_size), self.n)
        self.seed = int(seed)
        self.collate_fn = collate_fn or default_collate
        self.start = int(start)
        self.stop = stop
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def indices(self, step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = make_generator(derive_seed(self.seed, epoch, _EPOCH_STREAM))
            self._perm = torch.randperm(self.n, generator=gen)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm[within * self.batch_size : (within + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        steps = itertools.count(self.start) if self.stop is None else range(self.start, self.stop)
        for step in steps:
            yield self.indices(step).tolist()

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("An open-ended BatchSampler has no length")
        return max(0, self.stop - self.start)

    def batch(self, step: int) -> Any:
        """The collated batch of ``step`` (what the loader yields at that step)."""
        idx = self.indices(step)
        if isinstance(self.data, TensorDataset) and self.collate_fn is default_collate:
            return tuple(t[idx] for t in self.data.tensors)  # the same values, no per-item copy
        getitems = getattr(self.data, "__getitems__", None)
        items = getitems(idx.tolist()) if callable(getitems) else [self.data[int(i)] for i in idx]
        return self.collate_fn(items)

    def loader(self, start: int, stop: int | None = None, num_workers: int = 0) -> DataLoader:
        """A ``DataLoader`` yielding the batches of steps ``start .. stop - 1``."""
        view = BatchSampler(
            self.data,
            self.batch_size,
            self.seed,
            collate_fn=self.collate_fn,
            start=start,
            stop=stop,
        )
        return DataLoader(
            self.data,
            batch_sampler=view,
            collate_fn=self.collate_fn,
            num_workers=num_workers,
            generator=make_generator(derive_seed(self.seed, _WORKER_STREAM)),
        )


def unpack_loader(
    data: Any, batch_size: int | None, collate_fn: Callable[[list[Any]], Any] | None
) -> tuple[Dataset, int | None, Callable[[list[Any]], Any] | None]:
    """``(dataset, batch_size, collate_fn)`` of ``data``: a Dataset as it is, a DataLoader's
    own dataset, batch size and collate function (explicit arguments win)."""
    if not isinstance(data, DataLoader):
        return data, batch_size, collate_fn
    own_collate = data.collate_fn if data.collate_fn is not default_collate else None
    return data.dataset, batch_size or data.batch_size, collate_fn or own_collate
