"""Aspect-ratio grouped, rank-sharded, resumable batch sampler for training.

Batches hold images of one orientation (landscape w >= h, or portrait) so padding to the batch's largest
image wastes little, as torchvision's references and mmdet's ``AspectRatioBatchSampler`` do. Sharding is
mmdet's: the epoch's shuffled index list is split across ranks first, then each rank groups its own share.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _dist_default(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
    return num_replicas, rank


class _EpochHook:
    """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` only (``_set_sampler_epoch``);
    this stands there and forwards the call to the batch sampler."""

    def __init__(self, owner: GroupedBatchSampler):
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class GroupedBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of dataset indices for one epoch.

    Args:
        group_ids: one group id per dataset index (e.g. 0 landscape, 1 portrait).
        batch_size: images per batch on this rank.
        shuffle: permute the indices each epoch with a generator seeded ``seed + epoch``.
        num_replicas, rank: the process group; default from ``torch.distributed`` when initialised.
        with_seeds: yield ``(index, seed)`` pairs instead of indices, the seed a function of (``seed``,
            epoch, index) only, so a dataset can draw its augmentation from it: the same sample gets the
            same augmentation whatever the number of workers, the pre-fetching or a mid-epoch resume.

    Every rank yields ``len(self)`` batches (the index list is padded by repeating its start so it divides
    evenly, as ``DistributedSampler``): all batches are full except possibly the last, which collects
    the groups' leftovers. After a complete pass the epoch advances by itself, so training without a
    ``set_epoch`` call still reshuffles; ``set_epoch`` / ``load_state_dict`` set it explicitly.

    ``state_dict()`` is ``{"epoch", "batches_yielded"}``; ``load_state_dict`` makes the next pass replay
    that epoch's order without its first ``batches_yielded`` batches (mid-epoch resume).
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, with_seeds: bool = False):
        if isinstance(group_ids, torch.Tensor):
            group_ids = group_ids.tolist()
        if not isinstance(group_ids, Sequence) or not all(isinstance(g, int) for g in group_ids):
            raise TypeError(f"group_ids must be a sequence of ints, got {type(group_ids).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas, self.rank = _dist_default(num_replicas, rank)
        self.with_seeds = with_seeds
        self.num_samples = math.ceil(len(self.group_ids) / self.num_replicas)  # per rank
        self.epoch = 0
        self._skip = 0      # batches to leave out of the next pass (restored position)
        self._yielded = 0   # batches handed out in the current pass, counting skipped ones
        self.sampler = _EpochHook(self)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._skip = 0
            self._yielded = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        skip = int(state["batches_yielded"])
        if not 0 <= skip <= len(self):
            raise ValueError(f"batches_yielded={skip} is outside [0, {len(self)}] for this sampler")
        self.epoch = int(state["epoch"])
        self._skip = skip
        self._yielded = skip

    def rank_indices(self) -> list[int]:
        """This rank's share of the epoch's (shuffled, padded) index list, in order."""
        n = len(self.group_ids)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.num_samples * self.num_replicas
        while len(order) < total and n > 0:
            order += order[: total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def batches(self) -> list[list[int]]:
        """The whole epoch's batches for this rank (what a full pass yields)."""
        buckets: dict[int, list[int]] = {}
        batches = []
        for index in self.rank_indices():
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket)
                buckets[self.group_ids[index]] = []
        leftovers = [i for group in sorted(buckets) for i in buckets[group]]
        batches += [leftovers[i:i + self.batch_size] for i in range(0, len(leftovers), self.batch_size)]
        return batches

    def sample_seed(self, index: int) -> int:
        return ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % (1 << 63)

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        batches = self.batches()
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for batch in batches[skip:]:
            self._yielded += 1
            yield [(i, self.sample_seed(i)) for i in batch] if self.with_seeds else batch
        self.epoch += 1
        self._yielded = 0
