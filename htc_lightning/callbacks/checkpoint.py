"""Default checkpointing and lr logging, tolerant of models and runs that lack what they monitor."""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .._lightning_compat import (
    checkpoint_schedule,
    lightning_find_last_checkpoints,
    lightning_save_topk_checkpoint,
    model_checkpoint_with_own_hooks,
    save_last_checkpoint_only,
)
from .checkpoint_io import stale_temporaries


@model_checkpoint_with_own_hooks
class DetectionCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` keeping ``last.ckpt`` and the best by ``val/segm_mAP``, with fallbacks.

    A box-only model logs no ``val/segm_mAP`` and a proposal-only one logs ``val/AR@1000``; a run without
    validation logs neither. Instead of failing, the monitored key falls back to the first of
    ``fallback_monitors`` that was logged (once, with a message); when none is, only ``last.ckpt`` is kept.
    Without ``dirpath``, checkpoints go to ``{default_root_dir}/checkpoints`` whatever the logger.
    ``ckpt_path="last"`` picks the newest of ``last*.ckpt`` and SLURM's ``hpc_ckpt_<n>.ckpt`` (written in
    ``default_root_dir`` on the requeue signal), so a requeued job given ``--ckpt_path last`` continues from
    whichever of the two was written last.
    """

    def __init__(self, *args, fallback_monitors: Sequence[str] = ("val/bbox_mAP", "val/AR@1000"),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fallback_monitors = tuple(fallback_monitors)
        self._warned_missing = False
        self._last_only_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning's default directory is the logger's version folder, which changes with every run, so
        # ``--ckpt_path last`` would never find the previous run's last.ckpt; a fixed folder makes it work.
        if self.dirpath is None:
            self.dirpath = os.path.join(str(trainer.default_root_dir), "checkpoints")
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:  # only rank 0 writes checkpoints, so only it cleans up
            self.remove_stale_temporaries(trainer)

    def remove_stale_temporaries(self, trainer: pl.Trainer) -> None:
        removed, size = [], 0
        for folder in dict.fromkeys([str(self.dirpath), str(trainer.default_root_dir)]):  # HPC checkpoints: the root
            for path in stale_temporaries(folder):
                try:
                    size += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(str(path))
        if removed:
            rank_zero_info(f"removed {len(removed)} temporary file(s) of checkpoint saves that were killed mid-write "
                           f"({size / 2**20:.1f} MiB): {', '.join(removed)}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        every_n_steps, _ = checkpoint_schedule(self)
        if every_n_steps >= 1 and trainer.global_step % every_n_steps == 0:
            self._save_last_on_schedule(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        _, every_n_epochs = checkpoint_schedule(self)
        if every_n_epochs >= 1 and (trainer.current_epoch + 1) % every_n_epochs == 0:
            self._save_last_on_schedule(trainer, on_train_epoch_end=True)

    def _save_last_on_schedule(self, trainer: pl.Trainer, on_train_epoch_end: bool = False) -> None:
        """``last.ckpt`` at a scheduled point where Lightning saved nothing because the monitored metric is missing
        (once per step: the last batch of an epoch may be both a step and an epoch point)."""
        if self.save_last and self._last_only_step != trainer.global_step \
                and save_last_checkpoint_only(self, trainer, on_train_epoch_end):
            self._last_only_step = trainer.global_step

    def find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """Lightning's candidates for ``ckpt_path="last"`` and SLURM's ``hpc_ckpt_<n>.ckpt`` in the root."""
        found = lightning_find_last_checkpoints(self, trainer)
        root = Path(str(trainer.default_root_dir))
        if root.is_dir():
            found |= {os.path.normpath(p) for p in root.iterdir() if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", p.name)}
        return found

    def save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        """Lightning's best-checkpoint save, by the first logged of ``monitor`` and ``fallback_monitors``."""
        if self.monitor is not None and self.monitor not in monitor_candidates:
            fallback = next((m for m in self.fallback_monitors if m in monitor_candidates), None)
            if fallback is not None:
                rank_zero_info(f"{self.monitor!r} was not logged: keeping the best checkpoint by {fallback!r}")
                self.monitor = fallback
            else:
                if not self._warned_missing:
                    rank_zero_warn(f"none of {(self.monitor, *self.fallback_monitors)} was logged (no validation?): "
                                   "only last.ckpt is saved")
                    self._warned_missing = True
                return
        lightning_save_topk_checkpoint(self, trainer, monitor_candidates)


class OptionalLearningRateMonitor(LearningRateMonitor):
    """``LearningRateMonitor`` that stays quiet, instead of failing, when the trainer has no logger."""

    def on_train_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        self._disabled = not trainer.loggers
        if not self._disabled:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if not getattr(self, "_disabled", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if not getattr(self, "_disabled", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)
