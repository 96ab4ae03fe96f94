"""DetectionModule: losses and logging, lr scaling and schedule, evaluation metrics, subclass hooks, precision."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import TinyCocoDataModule, make_detector
from torch import nn

from htc_lightning.module import DetectionModule


def trainer_for(root, max_steps: int = 2, **kwargs) -> pl.Trainer:
    kwargs.setdefault("limit_val_batches", 0)
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root), **kwargs)


class RecordLosses(pl.Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append((outputs["loss"].detach(), dict(trainer.callback_metrics)))


def test_training_step_sums_loss_terms_only_and_logs_each_term(tmp_path):
    rec = RecordLosses()
    pl.seed_everything(0, verbose=False)
    module = DetectionModule(make_detector(), lr=0.01, log_images=0)
    trainer_for(tmp_path, 1, callbacks=[rec]).fit(module, TinyCocoDataModule(str(tmp_path / "d")))
    loss, logged = rec.outputs[0]
    terms = {k: float(logged[f"train/{k}"]) for k in ("loss_feat", "loss_bbox", "loss_cls")}
    assert float(loss) == pytest.approx(sum(terms.values()), rel=1e-5)
    assert "train/acc" in logged  # a metric: logged, but not part of the total
    assert float(logged["train/loss"]) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize(("batch_size", "accumulate", "expected"), [(2, 1, 0.02 * 2 / 16), (2, 3, 0.02 * 6 / 16)])
def test_lr_scales_linearly_with_the_global_batch(tmp_path, batch_size, accumulate, expected):
    module = DetectionModule(make_detector(), lr=0.02, base_batch_size=16, log_images=0)
    trainer = trainer_for(tmp_path, 1, accumulate_grad_batches=accumulate)
    trainer.fit(module, TinyCocoDataModule(str(tmp_path / "d"), batch_size=batch_size))
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(expected)


def test_a_module_used_on_its_own_has_no_trainer_and_sets_up_without_one(tmp_path):
    module = DetectionModule(make_detector(), log_images=0)
    assert module.attached_trainer() is None
    module.setup("fit")  # no datamodule to check the semantic maps against: nothing to complain about
    trainer = trainer_for(tmp_path, 1)
    trainer.fit(module, TinyCocoDataModule(str(tmp_path / "d")))
    assert module.attached_trainer() is trainer


def mmdet_lr(base: float, step: int, epoch: int, warmup_iters: int, warmup_ratio: float = 0.001,
             max_epochs_schedule=(8, 11), gamma: float = 0.1) -> float:
    """mmdet's recipe: linear warm-up by iteration, ``1 - (1 - r)(1 - i / w)``, times step decay by epoch."""
    warmup = 1 - (1 - warmup_ratio) * (1 - step / warmup_iters) if step < warmup_iters else 1.0
    return base * warmup * gamma ** sum(epoch >= milestone for milestone in max_epochs_schedule)


# the schedule's shape in each tiny config (lr and base_batch_size only scale it)
SCHEDULE_KEYS = ("warmup_iters", "warmup_ratio", "max_epochs_schedule", "gamma")
TINY_SCHEDULES = sorted({json.dumps({k: v for k, v in yaml.safe_load(path.read_text())["model"]["init_args"].items()
                                     if k in SCHEDULE_KEYS}, sort_keys=True)
                         for path in (Path(__file__).parents[1] / "configs" / "tiny").glob("*.yaml")})


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("schedule", TINY_SCHEDULES)
def test_lr_at_every_step_is_mmdets_warmup_then_step_decay_for_the_tiny_configs(tmp_path, schedule, accumulate):
    schedule = json.loads(schedule)
    lrs = []

    class LR(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    module = DetectionModule(make_detector(), lr=1e-6, base_batch_size=2, log_images=0, **schedule)
    # 5 batches: with accumulation the last step of an epoch takes fewer; the warm-up crosses epochs and decays
    trainer = trainer_for(tmp_path, -1, max_epochs=12, accumulate_grad_batches=accumulate, callbacks=[LR()])
    trainer.fit(module, TinyCocoDataModule(str(tmp_path / "d"), num_train=10, batch_size=2))
    steps_per_epoch = math.ceil(5 / accumulate)
    assert len(lrs) == 12 * steps_per_epoch
    expected = [mmdet_lr(1e-6 * accumulate, step, step // steps_per_epoch, **schedule) for step in range(len(lrs))]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_the_1x_recipe_lr_follows_mmdets_formula_over_a_whole_coco_schedule():
    # the schedulers as configure_optimizers builds them, stepped as Lightning does: 500 warm-up steps at 7330
    # steps per epoch (COCO at batch 16); the chained warm-up must not drift from the closed form
    module = DetectionModule(nn.Linear(1, 1))
    module.lr_scale = lambda: 1.0
    [optimizer], schedulers = module.configure_optimizers()
    warmup, decay = (s["scheduler"] for s in schedulers)
    assert [s["interval"] for s in schedulers] == ["step", "epoch"]
    steps_per_epoch, lrs = 7330, []
    for step in range(12 * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        warmup.step()
        if (step + 1) % steps_per_epoch == 0:
            decay.step()
    expected = [mmdet_lr(0.02, step, step // steps_per_epoch, warmup_iters=500) for step in range(len(lrs))]
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("ratio", [0.0, 1.5])
def test_a_warmup_ratio_outside_0_1_is_an_error_naming_it(ratio):
    with pytest.raises(ValueError, match=f"warmup_ratio={ratio}: expected 0 < warmup_ratio <= 1"):
        DetectionModule(nn.Linear(1, 1), warmup_ratio=ratio)


def test_lr_follows_the_schedule_in_training(tmp_path):
    lrs = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = DetectionModule(make_detector(), lr=0.16, base_batch_size=16, warmup_iters=2, warmup_ratio=0.5,
                       max_epochs_schedule=[1], log_images=0)
    dm = TinyCocoDataModule(str(tmp_path / "d"), num_train=4, batch_size=2)  # 2 steps per epoch
    trainer_for(tmp_path, 5, callbacks=[LR()]).fit(module, dm)
    base = 0.16 * 2 / 16
    assert lrs == pytest.approx([base * 0.5, base * 0.75, base * 0.1, base * 0.1, base * 0.1])


def test_validation_logs_coco_metrics_for_perfect_and_shifted_boxes(tmp_path):
    dm = TinyCocoDataModule(str(tmp_path / "d"))
    perfect = DetectionModule(make_detector(init_offset=0.0), log_images=0)
    metrics = trainer_for(tmp_path, limit_val_batches=1.0).validate(perfect, dm, verbose=False)[0]
    # the detector returns exactly the ground truth, with the right original category ids: AP is 1
    assert metrics["val/bbox_mAP"] == pytest.approx(1.0)
    assert metrics["val/segm_mAP"] == pytest.approx(1.0)
    shifted = DetectionModule(make_detector(init_offset=3.0), log_images=0)
    metrics = trainer_for(tmp_path, limit_val_batches=1.0).validate(shifted, dm, verbose=False)[0]
    assert 0.0 < metrics["val/bbox_mAP"] < 1.0 and metrics["val/bbox_mAP_50"] == pytest.approx(1.0)


def test_test_stage_logs_under_test_prefix(tmp_path):
    module = DetectionModule(make_detector(init_offset=0.0), log_images=0)
    trainer = trainer_for(tmp_path, limit_test_batches=1.0)
    metrics = trainer.test(module, TinyCocoDataModule(str(tmp_path / "d")), verbose=False)[0]
    assert metrics["test/segm_mAP"] == pytest.approx(1.0)


def test_box_only_detector_is_evaluated_on_boxes_only(tmp_path):
    module = DetectionModule(make_detector(init_offset=0.0, with_mask=False), log_images=0)
    trainer = trainer_for(tmp_path, limit_val_batches=1.0)
    metrics = trainer.validate(module, TinyCocoDataModule(str(tmp_path / "d")), verbose=False)[0]
    assert metrics["val/bbox_mAP"] == pytest.approx(1.0)
    assert not any(k.startswith("val/segm") for k in metrics)


class NoBboxLossModule(DetectionModule):
    """A research variant: replaces one term through the compute_loss hook."""

    def compute_loss(self, batch, metrics=None):
        losses = super().compute_loss(batch, metrics)
        losses["loss_bbox"] = losses["loss_bbox"] * 0.0
        return losses


def test_subclass_can_replace_a_loss_term_through_compute_loss(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = NoBboxLossModule(make_detector(), lr=0.05, base_batch_size=2, warmup_iters=0, weight_decay=0.0,
                              log_images=0)
    offset_before = module.detector.roi_head.offset.detach().clone()
    trainer_for(tmp_path, 2).fit(module, TinyCocoDataModule(str(tmp_path / "d")))
    assert torch.equal(module.detector.roi_head.offset, offset_before)  # only loss_bbox reaches the offset
    assert not torch.equal(module.detector.roi_head.cls_logits, torch.zeros(2))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_step_runs_on_cpu(tmp_path, precision):
    rec = RecordLosses()
    module = DetectionModule(make_detector(), lr=0.01, log_images=0)
    trainer_for(tmp_path, 2, precision=precision, callbacks=[rec]).fit(module, TinyCocoDataModule(str(tmp_path / "d")))
    assert len(rec.outputs) == 2 and all(torch.isfinite(loss) for loss, _ in rec.outputs)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32


def test_validation_images_are_written_when_the_logger_has_no_image_support(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    module = DetectionModule(make_detector(init_offset=0.0), log_images=3, score_thr_vis=0.0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=CSVLogger(str(tmp_path)), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         val_check_interval=1)
    trainer.fit(module, TinyCocoDataModule(str(tmp_path / "d")))
    pngs = sorted((tmp_path / "lightning_logs" / "version_0" / "val_images").glob("*.png"))
    assert len(pngs) == 3
