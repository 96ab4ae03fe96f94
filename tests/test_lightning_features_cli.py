"""The Lightning features the README lists as working from the command line, run with exactly those flags:
EMA of the weights, gradient accumulation, early stopping, another logger."""
from __future__ import annotations

import torch
from conftest import fake_cli_config
from pytorch_lightning.callbacks import EarlyStopping, EMAWeightAveraging
from pytorch_lightning.loggers import CSVLogger

from htc_lightning.cli import HTCLightningCLI


def test_ema_accumulation_early_stopping_and_csv_logger_from_flags(tmp_path):
    config = fake_cli_config(tmp_path, max_steps=4)
    cli = HTCLightningCLI(args=[
        "fit", "--config", config,
        "--trainer.callbacks+=EMAWeightAveraging", "--trainer.callbacks.decay", "0.9",
        "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/bbox_mAP",
        "--trainer.callbacks.mode", "max", "--trainer.callbacks.patience", "3",
        "--trainer.accumulate_grad_batches", "2",
        "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs")])
    trainer = cli.trainer
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
    assert ema._average_model is not None and ema._average_model.n_averaged > 0  # the EMA copy was updated
    assert any(isinstance(c, EarlyStopping) and c.monitor == "val/bbox_mAP" for c in trainer.callbacks)
    assert "val/bbox_mAP" in trainer.callback_metrics  # what early stopping watches is logged
    # 4 optimiser steps of 2 batches each: accumulation halves the steps per epoch (and the lr scales with it)
    assert trainer.global_step == 4 and trainer.fit_loop.total_batch_idx + 1 == 8
    assert cli.model.global_batch_size() == 2 * cli.datamodule.batch_size
    assert isinstance(trainer.logger, CSVLogger)
    assert list((tmp_path / "logs").rglob("metrics.csv"))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
