"""Checkpoint before a preemption kills the job."""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info


class SigtermCheckpoint(Callback):
    """On SIGTERM, save ``last.ckpt`` at the end of the current batch, then let the job stop.

    Lightning's signal connector turns SIGTERM into ``SIGTERMException`` raised after the running
    batch finishes (all ranks agree on it). This callback saves at that point, into the
    ``ModelCheckpoint`` directory under the ``last`` name, so ``fit --ckpt_path last`` continues
    from the interrupted step. SLURM's SIGUSR1 (``auto_requeue``) is Lightning's own path: it writes
    ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` and requeues the job; a requeued run loads it.

    Args:
        filename: checkpoint file name inside the checkpoint directory.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.saved_path: str | None = None

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None) if isinstance(callback, ModelCheckpoint) else None
        if dirpath is None:
            dirpath = Path(trainer.default_root_dir) / "checkpoints"
        return os.path.join(str(dirpath), self.filename)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = self.checkpoint_path(trainer)
        # save_checkpoint is collective-safe here: every rank raised SIGTERMException at the same batch.
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
