"""Checkpoint before a preemption kills the job, on one process or under DDP.

Why not Lightning's own handlers: Lightning 2.6's SIGTERM handler forwards the signal to the child ranks
(``launcher.kill``) and runs a collective (``dist.broadcast``) *inside the signal handler*, i.e. wherever
the main thread happens to be; SLURM's requeue handler even saves a checkpoint (a barrier) there. A rank
that gets SIGTERM from the cluster and again from rank 0 broadcasts twice, the ranks' sequences of
collectives no longer match, and the barrier of ``save_checkpoint`` / teardown waits forever. Here the
handlers only set a flag; once per training step, after ``on_train_batch_end``, every rank all-reduces the
flags, so all ranks act on the same step: SIGTERM -> ``last.ckpt`` and exit; requeue signal -> Lightning's
HPC checkpoint and ``scontrol requeue``, then training goes on until the scheduler stops it.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from .._lightning_compat import cluster_environment, run_slurm_requeue, stop_as_on_sigterm

# What a preempted CLI run exits with: the shell's convention for "terminated by SIGTERM".
SIGTERM_EXIT_CODE = 128 + int(signal.SIGTERM)


def requeue_signal(trainer: pl.Trainer) -> int | None:
    """The signal SLURM sends before the time limit when Lightning's auto-requeue is on, else None."""
    environment = cluster_environment(trainer)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return int(environment.requeue_signal or signal.SIGUSR1)
    return None


class SigtermCheckpoint(Callback):
    """On SIGTERM (any rank), every rank stops after the same training step; ``last.ckpt`` is saved once.

    The save goes into the ``ModelCheckpoint`` directory under the ``last`` name and is registered as that
    callback's last checkpoint, so ``fit --ckpt_path last`` continues from the interrupted step and a resumed
    run keeps overwriting the same file (no ``last-v1.ckpt``). With ``SLURMEnvironment(auto_requeue=True)``
    the requeue signal (SIGUSR1) is deferred the same way to Lightning's HPC checkpoint and requeue.

    Args:
        filename: checkpoint file name inside the checkpoint directory.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.saved_path: str | None = None
        self._received: dict[int, bool] = {}
        self._requeue_signum: int | None = None

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None) if isinstance(callback, ModelCheckpoint) else None
        if dirpath is None:
            dirpath = Path(trainer.default_root_dir) / "checkpoints"
        return os.path.join(str(dirpath), self.filename)

    # -- signals: only remember them --------------------------------------------------------------------

    def _remember(self, signum: int, _frame) -> None:
        self._received[signum] = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Last in the list, so that the step's agreement also sees a signal another callback's
        # on_train_batch_end sent (a time-budget callback, a test) in the same step. A new list: Lightning is
        # iterating the current one to call this hook, and removing from it would skip the next callback.
        if self in trainer.callbacks:
            trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its handlers just before this hook and restores the previous ones at teardown.
        self._received = {}
        self._requeue_signum = requeue_signal(trainer)
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._remember)
        if self._requeue_signum is not None:
            signal.signal(self._requeue_signum, self._remember)

    # -- the agreed step ---------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        term, requeue = self._received.get(signal.SIGTERM, False), self._received.get(self._requeue_signum, False)
        if trainer.world_size > 1:
            flags = torch.tensor([term, requeue], dtype=torch.float32, device=trainer.strategy.root_device)
            term, requeue = (bool(v > 0) for v in trainer.strategy.reduce(flags, reduce_op="sum").tolist())
        if requeue:
            self._received.pop(self._requeue_signum, None)
            # Lightning's own requeue routine (HPC checkpoint on all ranks, scontrol on rank 0), now at a
            # point every rank reaches together instead of inside the signal handler.
            run_slurm_requeue(trainer, self._requeue_signum)
        if term and not trainer.received_sigterm:
            rank_zero_info(f"SIGTERM: every rank stops after step {trainer.global_step}")
            # the flag Lightning's loops check right after this hook: every rank raises SIGTERMException there
            stop_as_on_sigterm(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = self.checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and os.path.dirname(path) == str(callback.dirpath):
            # part of the saved state: the resumed run's ModelCheckpoint then overwrites this file
            callback.last_model_path = path
        # a collective: every rank raised SIGTERMException after the same step (see on_train_batch_end)
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
