"""A run interrupted mid-epoch and resumed from its checkpoint ends with the uninterrupted run's weights."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import SigtermAt, TinyCocoDataModule, make_detector

from htc_lightning.callbacks import ResumeState, SigtermCheckpoint
from htc_lightning.module import DetectionModule

N_STEPS = 7  # 4 batches per epoch: crosses the epoch boundary and the lr step at epoch 1


def make_module(seed: int = 0) -> DetectionModule:
    pl.seed_everything(seed, verbose=False)
    return DetectionModule(make_detector(), lr=0.05, base_batch_size=2, warmup_iters=3, max_epochs_schedule=[1],
                     log_images=0)


def make_trainer(root, callbacks, resume_state: bool = True) -> pl.Trainer:
    extra = [ResumeState(), SigtermCheckpoint()] if resume_state else [SigtermCheckpoint()]
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=N_STEPS, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(root), callbacks=[*extra, *callbacks])


def run_uninterrupted(tmp_path) -> dict[str, torch.Tensor]:
    module = make_module()
    make_trainer(tmp_path / "full", []).fit(module, TinyCocoDataModule(str(tmp_path / "data")))
    return {k: v.clone() for k, v in module.state_dict().items()}


def run_interrupted(tmp_path, k: int, resume_state: bool = True) -> dict[str, torch.Tensor]:
    root = tmp_path / f"cut{k}"
    with pytest.raises(SystemExit):
        make_trainer(root, [SigtermAt(k)], resume_state).fit(make_module(), TinyCocoDataModule(str(tmp_path / "data")))
    ckpt = root / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == k
    # a fresh process would start from a different RNG state: make sure nothing leaks from the first run
    pl.seed_everything(123, verbose=False)
    module = make_module(seed=1)  # different init: the checkpoint must overwrite everything
    trainer = make_trainer(root, [], resume_state)
    trainer.fit(module, TinyCocoDataModule(str(tmp_path / "data")), ckpt_path=str(ckpt))
    assert trainer.global_step == N_STEPS
    return module.state_dict()


@pytest.mark.parametrize("k", [2, 5])  # mid first epoch; mid second epoch
def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path, k):
    expected = run_uninterrupted(tmp_path)
    resumed = run_interrupted(tmp_path, k)
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_without_resume_state_the_run_diverges(tmp_path):
    # the control: Lightning alone restarts the epoch's batch order and the RNG, so the weights differ
    expected = run_uninterrupted(tmp_path)
    resumed = run_interrupted(tmp_path, 2, resume_state=False)
    assert any(not torch.equal(resumed[n], v) for n, v in expected.items())
