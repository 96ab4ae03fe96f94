"""Faults during training: non-finite losses, SIGTERM, SLURM's requeue signal, a crash while saving."""
from __future__ import annotations

import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyCocoDataModule, fake_cli_config, make_detector
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.trainer.states import TrainerFn

from htc_lightning.callbacks import AtomicCheckpointIO, ResumeState, SigtermCheckpoint
from htc_lightning.module import DetectionModule, NonFiniteLossError


def trainer_for(root, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(root), callbacks=list(callbacks), **kwargs)


def test_nan_loss_raises_naming_step_and_term(tmp_path):
    module = DetectionModule(make_detector(nan_at_call=2), lr=0.01, base_batch_size=2, log_images=0)
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 0, batch 2\).*loss_bbox=nan"):
        trainer_for(tmp_path, 4).fit(module, TinyCocoDataModule(str(tmp_path / "data")))


def test_nan_loss_skip_policy_skips_the_step_and_counts_it(tmp_path):
    class Snapshot(pl.Callback):
        def __init__(self):
            self.before, self.after = {}, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before[batch_idx] = pl_module.detector.roi_head.offset.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after[batch_idx] = pl_module.detector.roi_head.offset.detach().clone()

    snap = Snapshot()
    module = DetectionModule(make_detector(nan_at_call=1), lr=0.01, base_batch_size=2, warmup_iters=0,
                       nan_policy="skip", log_images=0)
    with pytest.warns(UserWarning, match="skipping step 1 .*loss_bbox=nan"):
        trainer = trainer_for(tmp_path, 3, [snap])
        trainer.fit(module, TinyCocoDataModule(str(tmp_path / "data")))
    assert module.skipped_steps == 1
    assert torch.equal(snap.before[1], snap.after[1])  # the NaN batch changed nothing
    assert not torch.equal(snap.before[2], snap.after[2])  # training went on
    assert trainer.global_step == 3
    assert torch.isfinite(module.detector.roi_head.offset).all()


class SignalAt(pl.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_saves_last_checkpoint_that_resumes(tmp_path):
    sigterm = SigtermCheckpoint()
    with pytest.raises(SystemExit):
        trainer_for(tmp_path, 6, [sigterm, SignalAt(3, signal.SIGTERM)]).fit(
            DetectionModule(make_detector(), log_images=0), TinyCocoDataModule(str(tmp_path / "data")))
    assert sigterm.saved_path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.load(sigterm.saved_path, weights_only=False)["global_step"] == 3
    trainer = trainer_for(tmp_path, 6, [SigtermCheckpoint()])
    trainer.fit(DetectionModule(make_detector(), log_images=0), TinyCocoDataModule(str(tmp_path / "data")),
                ckpt_path=sigterm.saved_path)
    assert trainer.global_step == 6


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "htc_train",
             "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "node1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0"}


def test_slurm_sigusr1_checkpoints_requeues_and_the_requeued_run_resumes(tmp_path, monkeypatch):
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    requeued = []
    monkeypatch.setattr("pytorch_lightning.trainer.connectors.signal_connector.call",
                        lambda cmd, **kw: requeued.append(cmd) or 0)
    # the job: SIGUSR1 (checkpoint + requeue), then SLURM's SIGTERM stops it
    callbacks = [ResumeState(), SigtermCheckpoint(), SignalAt(2, signal.SIGUSR1), SignalAt(3, signal.SIGTERM)]
    first = trainer_for(tmp_path, 8, callbacks, plugins=[SLURMEnvironment(auto_requeue=True)])
    with pytest.raises(SystemExit):
        first.fit(DetectionModule(make_detector(), log_images=0), TinyCocoDataModule(str(tmp_path / "data")))
    assert requeued == [["scontrol", "requeue", "4242"]]
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=False)["global_step"] == 2
    # the requeued job (same command, no ckpt_path) picks the HPC checkpoint up by itself
    second = trainer_for(tmp_path, 8, [ResumeState(), SigtermCheckpoint()],
                         plugins=[SLURMEnvironment(auto_requeue=True)])
    resumed_from = []

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            resumed_from.append(trainer.global_step)

    second.callbacks.append(Spy())
    second.fit(DetectionModule(make_detector(), log_images=0), TinyCocoDataModule(str(tmp_path / "data")))
    assert resumed_from == [2] and second.global_step == 8


class CrashingIO(AtomicCheckpointIO):
    """Writes half the checkpoint, then dies, as a job killed in the middle of a save."""

    def write(self, checkpoint, f) -> None:
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt("killed mid-save")


def test_killed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(KeyboardInterrupt):
        CrashingIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left behind


def test_cli_trainer_uses_atomic_checkpoint_io(tmp_path):
    from htc_lightning.cli import HTCLightningCLI

    cli = HTCLightningCLI(args=["--trainer.accelerator=cpu", "--trainer.logger=false",
                                f"--trainer.default_root_dir={tmp_path}",
                                "--model.detector=conftest.FakeDetector",
                                "--model.detector.roi_head=conftest.FakeRoIHead",
                                "--data=conftest.TinyCocoDataModule", f"--data.root={tmp_path / 'data'}"],
                          run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_sigterm_checkpoint_moves_itself_last_without_skipping_another_callbacks_setup(tmp_path):
    class SetupSpy(pl.Callback):
        def __init__(self):
            self.stages = []

        def setup(self, trainer, pl_module, stage):
            self.stages.append(stage)

    sigterm, spy = SigtermCheckpoint(), SetupSpy()
    trainer = trainer_for(tmp_path, 1, [sigterm, spy])
    trainer.fit(DetectionModule(make_detector(), log_images=0), TinyCocoDataModule(str(tmp_path / "data")))
    assert spy.stages == ["fit"]
    assert trainer.callbacks[-1] is sigterm  # its per-step agreement sees what the other callbacks did


def test_ckpt_path_last_picks_the_newest_of_last_ckpt_and_the_slurm_hpc_checkpoint(tmp_path):
    from htc_lightning.cli import HTCLightningCLI

    trainer = HTCLightningCLI(args=["--config", fake_cli_config(tmp_path)], run=False).trainer
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    for path, mtime in ((ckpt_dir / "last.ckpt", 100), (tmp_path / "run" / "hpc_ckpt_1.ckpt", 200)):
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))

    def pick() -> str:  # what fit(ckpt_path="last") resolves to
        return trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, "last", model_provided=True,
                                                              model_connected=True)

    assert pick() == str(tmp_path / "run" / "hpc_ckpt_1.ckpt")
    os.utime(ckpt_dir / "last.ckpt", (300, 300))
    assert pick() == str(ckpt_dir / "last.ckpt")
