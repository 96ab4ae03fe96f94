"""Aspect-ratio grouped, rank-sharded, resumable batch sampler for training.

Batches hold images of one orientation (landscape w >= h, or portrait) so padding to the batch's largest
image wastes little, as torchvision's references and mmdet's ``AspectRatioBatchSampler`` do. Sharding is
mmdet's: the epoch's shuffled index list is split across ranks first, then each rank groups its own share.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

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


def repeat_factors(image_labels: Sequence[Iterable[int]], threshold: float) -> list[float]:
    """LVIS's repeat factors (Gupta et al. 2019, sec. 5; detectron2's ``RepeatFactorTrainingSampler``): a category
    in a fraction ``f(c)`` of the images gets ``r(c) = max(1, sqrt(threshold / f(c)))``, an image the largest
    ``r(c)`` of its categories (1 without any). LVIS uses ``threshold=0.001``."""
    if not threshold > 0:
        raise ValueError(f"repeat_factor_threshold must be > 0, got {threshold}")
    labels = [set(x) for x in image_labels]
    if not labels:
        return []
    counts: dict[int, int] = {}
    for image in labels:
        for c in image:
            counts[c] = counts.get(c, 0) + 1
    per_category = {c: max(1.0, math.sqrt(threshold / (n / len(labels)))) for c, n in counts.items()}
    return [max((per_category[c] for c in image), default=1.0) for image in labels]


class _EpochHook:
    """Lightning calls ``set_epoch`` on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler`` at every
    epoch start (``_set_sampler_epoch``), never on a batch sampler itself; this stands there and forwards the call,
    which makes Lightning's epoch counter the one owner of the sampler's epoch."""

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
    the groups' leftovers. The epoch is the caller's, as for ``DistributedSampler``: Lightning sets it at every
    epoch start (through ``self.sampler``, see ``_EpochHook``); a loop without Lightning calls ``set_epoch``
    itself, else every pass replays the same order. ``load_state_dict`` sets it for a resumed epoch.

    ``state_dict()`` is ``{"epoch", "batches_yielded"}``; ``load_state_dict`` makes the next pass replay
    that epoch's order without its first ``batches_yielded`` batches (mid-epoch resume).

    ``repeat_factors`` (one float >= 1 per index, see :func:`repeat_factors`) turns on repeat-factor sampling:
    each epoch index ``i`` appears ``floor(r_i)`` times plus once more with probability ``r_i - floor(r_i)``
    (detectron2's stochastic rounding), drawn from the epoch's seed, so every rank draws the same list before
    sharding and a resumed epoch replays it. The epoch length is fixed at ``round(sum(r))`` (the list is cut
    or padded by its start) so that every epoch has the same number of batches. Each copy draws its own
    augmentation.
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, with_seeds: bool = False,
                 repeat_factors: Sequence[float] | None = None):
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
        self.repeat_factors = None
        epoch_length = len(self.group_ids)
        if repeat_factors is not None:
            self.repeat_factors = torch.as_tensor(list(repeat_factors), dtype=torch.float64)
            if self.repeat_factors.shape != (len(self.group_ids),) or bool((self.repeat_factors < 1).any()):
                raise ValueError(f"repeat_factors: expected {len(self.group_ids)} values >= 1, got "
                                 f"{tuple(self.repeat_factors.shape)} values, min {self.repeat_factors.min()}")
            epoch_length = max(1, round(float(self.repeat_factors.sum())))
        self.epoch_length = epoch_length
        self.num_samples = math.ceil(epoch_length / self.num_replicas)  # per rank
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

    def _epoch_order(self) -> list[int]:
        """The whole epoch's list, the same on every rank. Copy ``c`` of index ``i`` under repeat-factor sampling
        is the virtual index ``i + c * n``: it draws its own augmentation seed, and copy 0 is ``i`` itself."""
        n = len(self.group_ids)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.repeat_factors is None:
            return torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        whole = self.repeat_factors.floor()
        copies = (whole + (torch.rand(n, generator=g, dtype=torch.float64) < self.repeat_factors - whole)).long()
        virtual = [i + c * n for i, k in enumerate(copies.tolist()) for c in range(k)]
        if self.shuffle:
            virtual = [virtual[j] for j in torch.randperm(len(virtual), generator=g).tolist()]
        return virtual[: self.epoch_length]

    def _rank_virtual(self) -> list[int]:
        order = self._epoch_order()
        total = self.num_samples * self.num_replicas
        while len(order) < total and order:
            order += order[: total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def rank_indices(self) -> list[int]:
        """This rank's share of the epoch's (shuffled, padded) index list, in order."""
        n = len(self.group_ids)
        return [v % n for v in self._rank_virtual()]

    def batches(self) -> list[list[int]]:
        """The whole epoch's batches for this rank (what a full pass yields)."""
        n = len(self.group_ids)
        return [[v % n for v in batch] for batch in self._virtual_batches()]

    def _virtual_batches(self) -> list[list[int]]:
        n = len(self.group_ids)
        buckets: dict[int, list[int]] = {}
        batches = []
        for index in self._rank_virtual():
            bucket = buckets.setdefault(self.group_ids[index % n], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket)
                buckets[self.group_ids[index % n]] = []
        leftovers = [i for group in sorted(buckets) for i in buckets[group]]
        batches += [leftovers[i:i + self.batch_size] for i in range(0, len(leftovers), self.batch_size)]
        return batches

    def sample_seed(self, index: int) -> int:
        return ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % (1 << 63)

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        n = len(self.group_ids)
        batches = self._virtual_batches()
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for batch in batches[skip:]:
            self._yielded += 1
            yield [(v % n, self.sample_seed(v)) for v in batch] if self.with_seeds else [v % n for v in batch]
        self._yielded = 0
