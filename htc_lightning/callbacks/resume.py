"""Exact mid-epoch resume: the train sampler's position and the random number generators.

Lightning restores the model, optimiser, schedulers and loop counters, and it would restore a dataloader
that is itself ``state_dict``-able (``CombinedLoader._state_dicts``, saved under the fit loop). A plain
``torch.utils.data.DataLoader`` is not, and even a stateful sampler's own count is ahead of the training
step: Lightning's fetcher pre-fetches one batch and DataLoader workers pre-fetch more. The exact position
is the loop's: the number of batches whose training step finished. This callback saves that number with
the epoch and, when a checkpoint is loaded, hands it to the new train batch sampler *before* Lightning
starts iterating it (by wrapping the ``train_dataloader`` hook for the duration of the fit).

The sampler protocol (``htc_lightning.data.samplers.GroupedBatchSampler``): ``load_state_dict({"epoch": e,
"batches_yielded": k})`` makes the next ``__iter__`` produce epoch ``e``'s order without its first ``k``
batches, a later ``set_epoch(e)`` with the same epoch keeps that position, and ``len()`` stays the full
epoch's count. The epoch itself is Lightning's to set: it calls ``loader.batch_sampler.sampler.set_epoch`` at every
epoch start, which ``GroupedBatchSampler.sampler`` forwards to the batch sampler; this callback only restores a
position within the epoch.

Global RNG states (torch, CUDA, numpy, random) are saved too and restored when the resumed training
starts, so model-side randomness (RoI sampling with ``torch.randperm``) replays identically. Under DDP
every rank's generators have drawn differently (each samples RoIs of its own images) and Lightning keeps
only rank 0's callback state, so the states and positions of all ranks are gathered into the checkpoint
and each rank restores its own. Data
augmentation should be seeded per sample (seed, epoch, index) rather than drawn from these generators,
since worker processes and pre-fetching make their consumption order differ between runs.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn


def rng_state() -> dict[str, Any]:
    """The global generators' states, as tensors and plain Python values (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _stateful_sampler(loader: Any) -> Any | None:
    for attr in ("batch_sampler", "sampler"):
        sampler = getattr(loader, attr, None)
        if sampler is not None and callable(getattr(sampler, "load_state_dict", None)):
            return sampler
    return None


class ResumeState(Callback):
    """Saves and restores what Lightning does not: the train sampler's mid-epoch position and the RNGs."""

    def __init__(self, restore_rng: bool = True) -> None:
        self.restore_rng = restore_rng
        self._pending: dict[str, Any] | None = None
        self._wrapped: Any = None

    @property
    def state_key(self) -> str:
        return "ResumeState"

    # -- save --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        loop = trainer.fit_loop
        # batches whose training step ran to the end in this epoch (pre-fetched ones are not counted)
        local = {"batches_consumed": loop.epoch_loop.batch_progress.current.processed, "rng": rng_state()}
        ranks = gather_objects(local, trainer.world_size)
        # the top-level entries are rank 0's (and what a single-process checkpoint holds)
        return {"epoch": loop.epoch_progress.current.processed, **ranks[0], "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) if state_dict else None

    def _own(self, state: dict[str, Any], key: str) -> Any:
        """``state[key]`` as this rank saved it (rank 0's when the checkpoint has no such rank)."""
        ranks = state.get("ranks") or [state]
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(ranks) != world:
            rank_zero_warn(f"the checkpoint was written by {len(ranks)} process(es), this run has {world}: "
                           f"every rank restores rank 0's {key!r}, so the run does not replay exactly")
            return ranks[0][key]
        return ranks[rank][key]

    # -- restore -----------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit":
            return
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        original = owner.train_dataloader

        def train_dataloader():
            loader = original()
            self.restore_position(loader)
            return loader

        owner.train_dataloader = train_dataloader  # an instance attribute shadowing the method until teardown
        self._wrapped = owner

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("train_dataloader", None)
            self._wrapped = None

    def restore_position(self, loader: Any) -> None:
        state = self._pending
        if not state or "epoch" not in state:
            return
        consumed = int(self._own(state, "batches_consumed"))
        try:
            length = len(loader)
        except TypeError:
            length = None
        if consumed <= 0 or (length is not None and consumed >= length):
            return  # saved at an epoch boundary: the next epoch starts from its first batch anyway
        sampler = _stateful_sampler(loader)
        if sampler is None:
            rank_zero_warn(f"resuming mid-epoch ({consumed} batches into epoch {state['epoch']}) but the train "
                           "dataloader's sampler has no load_state_dict: the epoch restarts from its first batch")
            return
        sampler.load_state_dict({"epoch": int(state["epoch"]), "batches_yielded": consumed})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if self.restore_rng and state and "rng" in state:
            set_rng_state(self._own(state, "rng"))


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective under DDP; ``[obj]`` on one process)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered
