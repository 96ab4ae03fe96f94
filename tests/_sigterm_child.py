"""Run by tests/test_sigterm_process_group.py in its own process group: fit a tiny HTC with DataLoader
workers, touch a marker file once training is under way, then keep training slowly until signalled."""
import sys
import time
from pathlib import Path

import pytorch_lightning as pl

from htc_lightning.cli import HTCLightningCLI


class MarkAndSlowDown(pl.Callback):
    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= 2:
            self.marker.touch()
        time.sleep(0.5)  # leave the parent time to signal mid-epoch


if __name__ == "__main__":
    config, marker = sys.argv[1], sys.argv[2]
    cli = HTCLightningCLI(args=["--config", config], run=False)
    cli.trainer.callbacks.append(MarkAndSlowDown(marker))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
