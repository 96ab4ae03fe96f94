"""Finite weights only: NaN/inf gradients with a finite loss, consecutive skips, and checkpoints of non-finite
weights, through real ``Trainer.fit`` runs (one process and two gloo processes)."""
from __future__ import annotations

import time

import pytest
import pytorch_lightning as pl
import torch
from conftest import FakeDetector, TinyCocoDataModule

from htc_lightning.callbacks import DetectionCheckpoint
from htc_lightning.module import DetectionModule, NonFiniteLossError, NonFiniteWeightsError


class NonFiniteDetector(FakeDetector):
    """``FakeDetector`` whose loss stays finite while the gradient of ``roi_head.offset`` is NaN at the calls in
    ``nan_grad_calls`` (sqrt'(0) * 0), and whose ``loss_aux`` term is NaN without any gradient at the calls in
    ``nan_loss_calls`` (calls of this process: under DDP each rank counts its own)."""

    def __init__(self, num_classes: int = 2, nan_grad_calls: tuple[int, ...] = (),
                 nan_loss_calls: tuple[int, ...] = ()) -> None:
        super().__init__(num_classes=num_classes)
        self.nan_grad_calls, self.nan_loss_calls = set(nan_grad_calls), set(nan_loss_calls)

    def loss(self, images, targets, metrics=None):
        call = self.calls
        losses = super().loss(images, targets, metrics)
        if call in self.nan_grad_calls:
            losses["loss_bbox"] = losses["loss_bbox"] + (self.roi_head.offset * 0).sqrt().sum()
        losses["loss_aux"] = images.new_tensor(float("nan") if call in self.nan_loss_calls else 0.0)
        return losses


class Record(pl.Callback):
    """Per batch: the offset weight and SGD momentum before and after the optimiser step."""

    def __init__(self) -> None:
        self.before, self.after, self.momentum_before, self.momentum_after = {}, {}, {}, {}

    @staticmethod
    def momentum(trainer, module) -> torch.Tensor | None:
        state = trainer.optimizers[0].state.get(module.detector.roi_head.offset, {})
        buf = state.get("momentum_buffer")
        return None if buf is None else buf.clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = pl_module.detector.roi_head.offset.detach().clone()
        self.momentum_before[trainer.global_step] = self.momentum(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.after[step] = pl_module.detector.roi_head.offset.detach().clone()
        self.momentum_after[step] = self.momentum(trainer, pl_module)


def module_for(nan_policy: str = "raise", max_consecutive_skips: int = 10, **detector) -> DetectionModule:
    # weight decay on, so a step that applied a zero gradient would still move the weights
    return DetectionModule(NonFiniteDetector(2, **detector), lr=0.01, base_batch_size=2, warmup_iters=0,
                           weight_decay=0.1, nan_policy=nan_policy, max_consecutive_skips=max_consecutive_skips,
                           log_images=0)


def fit(tmp_path, module, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    checkpoint = DetectionCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/segm_mAP", mode="max",
                                     save_last=True, every_n_train_steps=1, enable_version_counter=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[checkpoint, *callbacks], **kwargs)
    trainer.fit(module, TinyCocoDataModule(str(tmp_path / "data")))
    return trainer


def saved(path) -> tuple[int, torch.Tensor]:
    checkpoint = torch.load(path, weights_only=False)
    return checkpoint["global_step"], checkpoint["state_dict"]["detector.roi_head.offset"]


def test_nan_gradient_with_a_finite_loss_raises_naming_the_parameter_and_updates_nothing(tmp_path):
    record = Record()
    module = module_for("raise", nan_grad_calls=(2,))
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients \(the loss is finite\) at step 2 \(epoch 0, "
                                                 r"batch 2\): 1 parameter\(s\), detector\.roi_head\.offset"):
        fit(tmp_path, module, 4, [record])
    assert torch.equal(module.detector.roi_head.offset, record.before[2])  # the bad step changed nothing
    step, offset = saved(tmp_path / "ckpt" / "last.ckpt")
    assert step == 2 and torch.isfinite(offset).all() and torch.equal(offset, record.before[2])


def test_nan_gradient_skip_policy_leaves_weights_and_momentum_untouched_and_training_goes_on(tmp_path):
    record = Record()
    module = module_for("skip", nan_grad_calls=(2,))
    with pytest.warns(UserWarning, match=r"skipping step 2 .*non-finite gradients .*roi_head\.offset"):
        trainer = fit(tmp_path, module, 5, [record])
    assert module.skipped_steps == 1 and trainer.global_step == 5
    assert torch.equal(record.after[2], record.before[2])  # no update, not even weight decay
    assert torch.equal(record.momentum_after[2], record.momentum_before[2])
    assert not torch.equal(record.after[3], record.before[3])  # the next step trains
    assert torch.isfinite(module.detector.roi_head.offset).all()
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["skipped_steps"] == 1


def test_skip_policy_stops_with_an_error_after_max_consecutive_skips(tmp_path):
    module = module_for("skip", max_consecutive_skips=3, nan_grad_calls=tuple(range(1, 100)))
    with pytest.warns(UserWarning, match="skipping step"), \
            pytest.raises(NonFiniteLossError, match=r"3 consecutive steps skipped \(nan_policy=skip\), the last at "
                                                    r"step 3 .*max_consecutive_skips"):
        fit(tmp_path, module, 20)
    step, offset = saved(tmp_path / "ckpt" / "last.ckpt")
    assert step == 3 and torch.isfinite(offset).all()


def test_a_good_step_resets_the_consecutive_skip_count(tmp_path):
    # runs of 1, 2 and 2 skips (the last run ends on a NaN loss): never 3 in a row
    module = module_for("skip", max_consecutive_skips=3, nan_grad_calls=(1, 3, 4, 6), nan_loss_calls=(7,))
    with pytest.warns(UserWarning, match="skipping step"):
        trainer = fit(tmp_path, module, 9)
    assert trainer.global_step == 9 and module.skipped_steps == 5 and module.consecutive_skips == 0


def test_nan_loss_without_gradient_is_caught_too(tmp_path):
    module = module_for("raise", nan_loss_calls=(1,))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 .*loss_aux=nan"):
        fit(tmp_path, module, 3)


class Poison(pl.Callback):
    """Writes a NaN into a weight after training step ``step`` (before the checkpoint callback saves)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.detector.roi_head.offset[1] = float("inf")


def test_a_checkpoint_with_non_finite_weights_is_refused_and_the_previous_one_is_kept(tmp_path):
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to save a checkpoint at step 2: 1 tensor\(s\) of the "
                                                    r"model hold NaN or inf \(detector\.roi_head\.offset\)\. Nothing "
                                                    r"was written"):
        fit(tmp_path, module_for(), 5, [Poison(2)])
    step, offset = saved(tmp_path / "ckpt" / "last.ckpt")
    assert step == 1 and torch.isfinite(offset).all()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


class BatchNormDetector(NonFiniteDetector):
    """A BatchNorm in train mode after the backbone: a NaN batch writes NaN into its running statistics."""

    def __init__(self, num_classes: int = 2, nan_image_calls: tuple[int, ...] = ()) -> None:
        super().__init__(num_classes)
        self.norm = torch.nn.BatchNorm2d(2)
        self.nan_image_calls = set(nan_image_calls)

    def loss(self, images, targets, metrics=None):
        if self.calls in self.nan_image_calls:
            images = images * float("nan")
        losses = super().loss(images, targets, metrics)
        losses["loss_norm"] = self.norm(self.backbone(images)).pow(2).mean() * 1e-3
        return losses


def test_skip_refuses_a_step_whose_forward_already_wrote_nan_into_batchnorm_statistics(tmp_path):
    module = DetectionModule(BatchNormDetector(2, nan_image_calls=(2,)), lr=0.01, base_batch_size=2,
                             nan_policy="skip", log_images=0)
    with pytest.raises(NonFiniteLossError, match=r"cannot skip step 2 .*: its forward pass already wrote "
                                                r"non-finite values into detector\.norm\.running_mean, "
                                                r"detector\.norm\.running_var"):
        fit(tmp_path, module, 4)


# -- two processes ------------------------------------------------------------------------------------------------

class RankState(pl.Callback):
    """Each rank saves its weights and skip count at the end of training (ddp_spawn returns rank 0's only)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"offset": pl_module.detector.roi_head.offset.detach().clone(), "skipped": pl_module.skipped_steps,
                    "step": trainer.global_step}, f"{self.out}.rank{trainer.global_rank}.pt")


def test_ddp_ranks_agree_on_skipping_a_step_that_is_non_finite_on_one_rank_only(tmp_path):
    # rank 1: a NaN gradient at its call 1 (DDP's all-reduce spreads it); rank 0: a NaN loss term without gradient at
    # its call 3, which only rank 0 sees: without the all-reduced flag rank 0 would skip step 3 alone.
    module = DetectionModule(NonFiniteDetector(2), lr=0.01, base_batch_size=4, warmup_iters=0,
                             nan_policy="skip", log_images=0)
    per_rank = PerRankNonFinite(grad={1: {1}}, loss={0: {3}})
    trainer = pl.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_steps=5, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
                         callbacks=[per_rank, RankState(str(tmp_path / "state"))])
    trainer.fit(module, TinyCocoDataModule(str(tmp_path / "data"), num_train=16, batch_size=2))
    ranks = [torch.load(tmp_path / f"state.rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["skipped"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [5, 5]
    assert torch.equal(ranks[0]["offset"], ranks[1]["offset"]) and torch.isfinite(ranks[0]["offset"]).all()


class PerRankNonFinite(pl.Callback):
    """Sets the detector's NaN calls per rank when training starts (the module is pickled to each spawned rank)."""

    def __init__(self, grad: dict[int, set[int]], loss: dict[int, set[int]]) -> None:
        self.grad, self.loss = grad, loss

    def on_train_start(self, trainer, pl_module) -> None:
        detector = pl_module.detector
        detector.nan_grad_calls = self.grad.get(trainer.global_rank, set())
        detector.nan_loss_calls = self.loss.get(trainer.global_rank, set())


class RecordingModule(DetectionModule):
    """Each rank writes the message of the NaN guard's error, then waits a few seconds before raising it: the
    spawning process terminates the other ranks as soon as one fails. A rank that had not stopped would by then be
    waiting in the next gradient all-reduce, and write nothing."""

    out = ""

    def on_before_optimizer_step(self, optimizer) -> None:
        try:
            super().on_before_optimizer_step(optimizer)
        except NonFiniteLossError as error:
            with open(f"{self.out}.rank{self.global_rank}.txt", "w") as f:
                f.write(str(error))
            time.sleep(5)
            raise


def test_ddp_raise_stops_every_rank_at_the_step_only_one_rank_saw(tmp_path):
    # rank 0's loss term is NaN (without gradient) at its call 2; rank 1 sees nothing wrong, yet stops there too
    module = RecordingModule(NonFiniteDetector(2), lr=0.01, base_batch_size=4, warmup_iters=0,
                             log_images=0)
    module.out = str(tmp_path / "error")
    trainer = pl.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_steps=4, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
                         callbacks=[PerRankNonFinite(grad={}, loss={0: {2}})])
    with pytest.raises(Exception, match=r"non-finite loss at step 2 \(epoch 0, batch 2\)"):
        trainer.fit(module, TinyCocoDataModule(str(tmp_path / "data"), num_train=16, batch_size=2))
    errors = [(tmp_path / f"error.rank{r}.txt").read_text() for r in range(2)]
    assert errors[0].startswith("non-finite loss at step 2 (epoch 0, batch 2): loss_aux=nan")
    assert errors[1].startswith("non-finite loss at step 2 (epoch 0, batch 2): on another rank")
