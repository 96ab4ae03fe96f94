"""Two gloo CPU processes train without unused-parameter errors and validate to the single-process metric."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyCocoDataModule, make_detector

from htc_lightning.module import DetectionModule


def test_ddp_two_processes_match_one_process_validation(tmp_path):
    pl.seed_everything(0, verbose=False)
    # 5 val images: the DistributedSampler pads rank 1 with a repeat, which the evaluator must drop
    dm = TinyCocoDataModule(str(tmp_path / "data"), num_train=8, num_val=5, batch_size=2, val_batch_size=2)
    module = DetectionModule(make_detector(init_offset=3.0), lr=0.05, base_batch_size=4, warmup_iters=0, log_images=0)
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, num_sanity_val_steps=0, use_distributed_sampler=False)
    ddp = pl.Trainer(strategy="ddp_spawn", devices=2, max_epochs=1, default_root_dir=str(tmp_path / "ddp"), **common)
    before = module.detector.roi_head.offset.detach().clone()
    ddp.fit(module, dm)  # 2 steps per rank; a parameter without gradient would fail here (find_unused=False)
    assert not torch.equal(module.detector.roi_head.offset, before)  # rank 0's trained weights came back
    ddp_metrics = {k: float(v) for k, v in ddp.callback_metrics.items() if k.startswith("val/")}
    assert 0.0 < ddp_metrics["val/segm_mAP"] < 1.0

    single = pl.Trainer(devices=1, default_root_dir=str(tmp_path / "one"), **common)
    one_metrics = single.validate(module, dm, verbose=False)[0]  # module holds rank 0's trained weights
    for key, value in ddp_metrics.items():
        assert one_metrics[key] == pytest.approx(value, abs=1e-12), key
