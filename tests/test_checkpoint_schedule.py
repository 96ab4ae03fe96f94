"""Step checkpoints happen on schedule whether or not a validation has logged the monitored metric, and the
temporary files of saves killed mid-write are removed when the next run starts."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytorch_lightning as pl
import torch
from conftest import fake_cli_config

from htc_lightning.cli import HTCLightningCLI


class Saves(pl.Callback):
    """The global step of every checkpoint the trainer writes."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.steps.append(trainer.global_step)


def fit(tmp_path, *args: str, **trainer) -> tuple[HTCLightningCLI, Saves]:
    # TinyCocoDataModule: 8 train images at batch 2, so 4 steps per epoch; 3 epochs
    config = fake_cli_config(tmp_path, max_steps=-1, max_epochs=3, **trainer)
    cli = HTCLightningCLI(args=["--config", config, *args], run=False)
    saves = Saves()
    cli.trainer.callbacks.append(saves)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli, saves


def last_step(tmp_path) -> int:
    return torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def test_every_n_train_steps_writes_last_ckpt_on_schedule_without_validation(tmp_path):
    _, saves = fit(tmp_path, "--checkpoint.every_n_train_steps", "2", limit_val_batches=0)
    assert saves.steps == [2, 4, 6, 8, 10, 12]
    assert last_step(tmp_path) == 12


def test_every_n_train_steps_writes_last_ckpt_before_the_first_validation_and_the_best_after_it(tmp_path):
    _, saves = fit(tmp_path, "--checkpoint.every_n_train_steps", "2", check_val_every_n_epoch=2)
    # step 8 ends epoch 1, the first validation: last.ckpt on schedule, then the best one and last.ckpt again
    assert saves.steps[:4] == [2, 4, 6, 8] and sorted(set(saves.steps)) == [2, 4, 6, 8, 10, 12]
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best-epoch01-step8.ckpt", "last.ckpt"]


def test_each_epoch_writes_last_ckpt_without_validation(tmp_path):
    _, saves = fit(tmp_path, limit_val_batches=0)
    assert saves.steps == [4, 8, 12]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_files_of_killed_saves_are_removed_at_start_and_live_ones_kept(tmp_path):
    ckpt_dir, root = tmp_path / "run" / "checkpoints", tmp_path / "run"
    ckpt_dir.mkdir(parents=True)
    old = time.time() - 3600
    stale = [ckpt_dir / f".last.ckpt.tmp{dead_pid()}", root / f".hpc_ckpt_1.ckpt.tmp{dead_pid()}"]
    kept = [ckpt_dir / f".best.ckpt.tmp{os.getpid()}",  # this process
            ckpt_dir / f".last.ckpt.tmp{os.getppid()}",  # a live process (another run writing here)
            ckpt_dir / "notes.tmp1"]  # not a checkpoint temporary
    for path in stale + kept:
        path.write_bytes(b"\x80partial")
        os.utime(path, (old, old))
    young = ckpt_dir / f".best.ckpt.tmp{dead_pid()}"  # still being written from another node, perhaps
    young.write_bytes(b"\x80partial")
    fit(tmp_path, "--trainer.max_epochs", "1", limit_val_batches=0)
    assert not any(p.exists() for p in stale)
    assert [p.name for p in [*kept, young] if not p.exists()] == []
    assert (ckpt_dir / "last.ckpt").is_file()
