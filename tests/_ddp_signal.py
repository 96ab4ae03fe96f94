"""A callback for the DDP preemption tests (loaded by the CLI in each rank's process): after training step
``step`` the chosen ranks send themselves ``signal_name``, as a cluster does at preemption, and touch
``{marker}.rank<r>`` first so the test knows when the signal went out."""
import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM", ranks: str = "all", marker: str | None = None):
        self.step, self.signal_name, self.ranks, self.marker = step, signal_name, ranks, marker

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.step or self.ranks not in ("all", str(trainer.global_rank)):
            return
        if self.marker:
            Path(f"{self.marker}.rank{trainer.global_rank}").touch()
        os.kill(os.getpid(), getattr(signal, self.signal_name))
