"""``DetectionModule``: the Lightning side of a detector (optimisation, logging, evaluation, faults).

The :class:`~htc_lightning.models.detector.Detector` stays a plain ``nn.Module``; this class only decides
*when* it is called. Every step of the recipe is a small overridable method, so a research variant
subclasses the module and replaces one hook:

- :meth:`compute_loss` (batch -> dict of loss terms; accuracies into ``metrics``), :meth:`sum_losses` (the total),
- :meth:`check_finite` (the NaN/inf guard of losses and gradients), :meth:`configure_optimizers` (optimiser, warm-up
  and decay),
- :meth:`build_evaluator` (COCO metrics of a stage), :meth:`predict_batch` (batch -> Detections).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities.rank_zero import WarningCache, rank_zero_info
from torch import Tensor

from ._lightning_compat import built_by_lightning_cli
from .checkpoints.resume_check import apply_configured_optimiser, check_resume
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .models.detector import Detector
from .nonfinite import (
    RECOVERY,
    NonFiniteLossError,
    NonFiniteWeightsError,
    check_buffers,
    check_weights,
    step_culprits,
    step_flags,
)
from .optim import ParamGroupRule
from .optim import param_groups as build_param_groups
from .structures import Detections, ImageMeta
from .tta import TestTimeAugmentation

Batch = tuple[Tensor, list[dict]]

__all__ = ["DetectionModule", "NonFiniteLossError", "NonFiniteWeightsError"]

class DetectionModule(pl.LightningModule):
    """Train, validate, test and predict with any detector of the package (HTC, Cascade and Mask R-CNN, or a
    proposal generator alone).

    Args:
        detector: the :class:`Detector` (or a subclass, chosen by ``class_path`` in YAML); its parts are swapped
            inside it.
        lr: learning rate at ``base_batch_size`` images per optimiser step (mmdet: 0.02 at 16).
        base_batch_size: the lr is scaled linearly to the real global batch
            (``batch_size x world_size x accumulate_grad_batches``), the linear scaling rule mmdet applies.
        momentum, weight_decay: SGD settings of the mmdet recipe.
        warmup_iters, warmup_ratio: linear warm-up from ``warmup_ratio x lr`` over that many optimiser steps.
        max_epochs_schedule: epochs (0-based) at whose start the lr is multiplied by ``gamma``
            (mmdet 1x: 8 and 11 of 12 epochs).
        gamma: the step-decay factor.
        iou_types: COCO metrics to compute; ``None`` picks ``("bbox", "segm")`` for a mask model,
            ``("bbox",)`` without masks and ``("proposal",)`` for a proposal-only detector.
        backend: ``"pycocotools"`` or ``"faster_coco_eval"``.
        outfile_prefix: when set, test/validation results are also written as COCO json
            (``{prefix}.{stage}.bbox.json`` ...).
        nan_policy: what a non-finite loss term or gradient does (checked after backward, before the optimiser
            step): ``"raise"`` stops training there, naming the step and the terms or parameters; ``"skip"`` skips
            that optimiser step (no weight, momentum or weight-decay change) and counts it
            (``train/skipped_steps``). Under a GradScaler (``16-mixed``) a non-finite gradient with finite losses
            is an fp16 overflow, which the scaler skips and backs off from by itself (not counted here).
            A checkpoint is never written with non-finite weights (:class:`NonFiniteWeightsError`).
        max_consecutive_skips: with ``nan_policy="skip"``, this many skipped steps in a row stop the run with
            :class:`NonFiniteLossError` (a diverged run would otherwise skip every remaining step and exit 0).
        log_images: number of validation images drawn with their detections and sent to the logger each
            validation epoch (0 disables it).
        score_thr_vis: detections below this score are not drawn.
        tta: when set, validation, test and predict run the detector through this multi-scale + flip
            test-time augmentation (:class:`~htc_lightning.tta.TestTimeAugmentation`) instead of
            ``detector.predict``; training is unaffected.
        load_from: initialise the detector's weights (only) from this file before fit/validate/test/predict:
            an mmdetection checkpoint (v2/v3 layout, ``{"state_dict": ...}`` or bare) or one of our ``.ckpt``
            files (mmdet's ``load_from``). Layers sized by the class count are re-initialised at ``fit`` when the
            data has other classes (reported), and are an error at validate/test/predict. A ``ckpt_path``
            (resume) wins: then this is skipped.
        load_from_format: ``"v2"`` (mmdet 2.x and 3.x files) or ``"v1"`` (mmdet 1.x: background class first).
        classwise: also evaluate each category's box/mask AP and AP50: logged as ``{stage}/bbox_AP_<name>`` ...,
            and printed as a table at ``test`` (mmdet's ``classwise``).
        optimizer: any ``torch.optim`` optimizer by ``class_path`` (e.g. ``torch.optim.AdamW`` with its
            ``init_args``); its ``lr`` is the lr at ``base_batch_size`` and is scaled like ``lr``. ``None``: mmdet's
            SGD from ``lr``, ``momentum`` and ``weight_decay``.
        lr_scheduler: any ``torch.optim.lr_scheduler`` by ``class_path`` (e.g. ``CosineAnnealingLR`` with
            ``T_max`` in epochs), stepped every ``scheduler_interval`` after the linear warm-up (``warmup_iters``,
            ``warmup_ratio``, per step). ``None``: mmdet's warm-up and step decay (``max_epochs_schedule``, ``gamma``).
        scheduler_interval: ``"epoch"`` or ``"step"``: how often ``lr_scheduler`` steps.
        param_groups: :class:`~htc_lightning.optim.ParamGroupRule` list (``pattern``, ``lr_mult``, ``decay_mult``):
            per-parameter multipliers by name (mmdet's ``paramwise_cfg.custom_keys``), first match wins.
        norm_decay_mult, bias_decay_mult: weight-decay multipliers of normalisation layers and of biases
            (``0.0``: no decay on them); ``None`` leaves them as any other parameter.
    """

    def __init__(self, detector: Detector, lr: float = 0.02, base_batch_size: int = 16, momentum: float = 0.9,
                 weight_decay: float = 1e-4, warmup_iters: int = 500, warmup_ratio: float = 0.001,
                 max_epochs_schedule: Sequence[int] = (8, 11), gamma: float = 0.1,
                 iou_types: Sequence[str] | None = None,
                 backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools",
                 outfile_prefix: str | None = None, nan_policy: Literal["raise", "skip"] = "raise",
                 log_images: int = 4, score_thr_vis: float = 0.3, tta: TestTimeAugmentation | None = None,
                 load_from: str | None = None, load_from_format: Literal["v2", "v1"] = "v2",
                 classwise: bool = False, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 scheduler_interval: Literal["epoch", "step"] = "epoch",
                 param_groups: Sequence[ParamGroupRule] = (), norm_decay_mult: float | None = None,
                 bias_decay_mult: float | None = None, max_consecutive_skips: int = 10) -> None:
        super().__init__()
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"nan_policy {nan_policy!r}: expected 'raise' or 'skip'")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips}: expected at least 1")
        if warmup_iters > 0 and not 0 < warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio={warmup_ratio}: expected 0 < warmup_ratio <= 1 (the warm-up starts at "
                             "warmup_ratio x lr), or warmup_iters=0 for no warm-up")
        # Under LightningCLI the hparams are the parsed config (the detector as class_path/init_args), which
        # lets ``test/predict --ckpt_path`` rebuild the model; from Python they would be the module object itself.
        # The TTA is a test-time choice, never stored: ``test --ckpt_path`` applies the checkpoint's hparams over
        # the config, so a stored ``tta: null`` would silently switch off the TTA the config asks for.
        self.save_hyperparameters(ignore=["tta"] if built_by_lightning_cli()
                                  else ["detector", "tta", "optimizer", "lr_scheduler"])
        self.detector = detector
        self.lr = lr
        self.base_batch_size = base_batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.max_epochs_schedule = sorted(int(e) for e in max_epochs_schedule)
        self.gamma = gamma
        self.iou_types = None if iou_types is None else tuple(iou_types)
        self.backend = backend
        self.outfile_prefix = outfile_prefix
        self.nan_policy = nan_policy
        self.max_consecutive_skips = max_consecutive_skips
        self.log_images = log_images
        self.score_thr_vis = score_thr_vis
        self.tta = tta
        self.load_from, self.load_from_format = load_from, load_from_format
        self.classwise = classwise
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.param_group_rules = [r if isinstance(r, ParamGroupRule) else ParamGroupRule(**r) for r in param_groups]
        self.norm_decay_mult, self.bias_decay_mult = norm_decay_mult, bias_decay_mult
        self.load_report = None
        self.resume_ckpt_path: str | None = None  # set by the CLI when the run restores a checkpoint
        self.written_results: list[str] = []
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._step_losses: list[dict[str, Tensor]] = []  # this optimiser step's loss terms (one per micro-batch)
        self._step_batch = (0, 0)  # (batch_idx, batch size) of its last micro-batch
        self._optimiser_from_config = False
        self._evaluator = None
        self._images_logged = 0

    # -- training ----------------------------------------------------------------------------------------

    def compute_loss(self, batch: Batch, metrics: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The detector's loss terms for one batch (override to add or replace a term). ``metrics``, when given,
        receives detached values that are logged but not optimised (the RoI head's box accuracies)."""
        images, targets = batch
        return self.detector.loss(images, targets, metrics=metrics)

    @staticmethod
    def sum_losses(losses: dict[str, Tensor]) -> Tensor:
        """The optimised total: the sum of every term (the loss dict holds losses only; accuracies and other
        watched values travel in ``compute_loss``'s ``metrics``)."""
        if not losses:
            raise ValueError("the detector returned no loss term")
        return torch.stack([v.sum() for v in losses.values()]).sum()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        metrics: dict[str, Tensor] = {}
        losses = self.compute_loss(batch, metrics)
        if "skipped" in batch[1][0].get("meta", {}):  # CocoDataModule(bad_images="skip"): samples replaced
            self.log("train/skipped_images", float(sum(len(t["meta"]["skipped"]) for t in batch[1])), reduce_fx="sum",
                     on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch[1]))
        total = self.sum_losses(losses)
        # checked with the gradients in on_before_optimizer_step, in the step's one host-device sync (a NaN
        # loss runs its backward; the step is then skipped or stopped before the optimiser touches a weight)
        self._step_losses.append({k: v.detach() for k, v in losses.items()})
        batch_size = len(batch[1])
        self._step_batch = (batch_idx, batch_size)
        self.log_dict({f"train/{k}": v.detach().float().sum() for k, v in (losses | metrics).items()},
                      batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        return total

    def on_train_start(self) -> None:
        self._step_losses = []
        if self._optimiser_from_config:  # a resumed run whose config changed the lr, momentum or weight decay
            apply_configured_optimiser(self)
            self._optimiser_from_config = False

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.check_finite(optimizer):
            # SGD, Adam(W) and the other torch optimisers leave a parameter without .grad untouched: no update,
            # no momentum or weight decay. The step still counts (global_step, lr schedule), as a skipped batch.
            optimizer.zero_grad(set_to_none=True)
        if self.nan_policy == "skip":
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=self._step_batch[1])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The trainer's active GradScaler (``16-mixed``), or None."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def check_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        """True when this step's loss terms and gradients are all finite; otherwise raise or
        (``nan_policy="skip"``) return False, and the caller makes the optimiser step a no-op.

        One flag pair per step, computed on the device (a fused max-norm over all gradients), all-reduced under
        DDP so that every rank takes the same decision (a rank skipping alone would desynchronise the weights),
        and read with the step's only host-device sync. Under an active GradScaler, gradients are the scaler's
        to check: a non-finite one with finite losses is an fp16 overflow that the scaler skips itself.
        """
        step_losses, self._step_losses = self._step_losses, []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = step_flags(step_losses, grads if self.grad_scaler() is None else [], self.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        loss_bad, grad_bad = (v > 0 for v in bad.tolist())
        if not (loss_bad or grad_bad):
            self.consecutive_skips = 0
            return True
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {self._step_batch[0]})"
        kind, culprits = step_culprits(step_losses, self.named_parameters(), loss_bad)
        if self.nan_policy == "raise":
            raise NonFiniteLossError(f"non-finite {kind} at {where}: {culprits}. No weight was updated. Lower the lr, "
                                     "enable gradient clipping (trainer.gradient_clip_val), or set "
                                     "model.init_args.nan_policy=skip to skip such steps.")
        check_buffers(self, where)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self.consecutive_skips} consecutive steps skipped (nan_policy=skip), the last at {where} for "
                f"non-finite {kind}: {culprits}. The training has diverged: {RECOVERY}; or allow more skips with "
                "model.init_args.max_consecutive_skips.")
        warnings.warn(f"skipping {where}: non-finite {kind} {culprits} ({self.skipped_steps} skipped so far, "
                      f"{self.consecutive_skips} in a row)", stacklevel=2)
        return False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every rank runs this hook with the same weights (DDP), so all of them stop together, before any write
        check_weights(checkpoint.get("state_dict") or self.state_dict(), self.global_step,
                      getattr(self.trainer.checkpoint_callback, "dirpath", None))
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["consecutive_skips"] = self.consecutive_skips
        # the categories travel with the weights, so predict needs no annotation file (the CLI reads them back)
        categories = getattr(getattr(self.trainer, "datamodule", None), "categories", None)
        if categories is not None:
            checkpoint["categories"] = [dict(c) for c in categories]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # before Lightning's strict load: a clear error naming the keys, or (fit) the config changes reported once
        trainer = self.attached_trainer()
        self._optimiser_from_config = check_resume(
            checkpoint, self.hparams, self.state_dict(), getattr(trainer, "ckpt_path", None),
            fitting=trainer is not None and trainer.state.fn == "fit", strict=self.strict_loading)
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self.consecutive_skips = int(checkpoint.get("consecutive_skips", 0))


    # -- optimisation ------------------------------------------------------------------------------------

    def global_batch_size(self) -> int | None:
        """Images per optimiser step over all ranks, or None when the datamodule does not say."""
        dm = getattr(self.trainer, "datamodule", None)
        per_rank = getattr(dm, "batch_size", None)
        if per_rank is None:
            return None
        return int(per_rank) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def scaled_lr(self) -> float:
        return self.lr * self.lr_scale()

    def lr_scale(self) -> float:
        """The linear scaling rule's factor: global batch / ``base_batch_size``."""
        global_bs = self.global_batch_size()
        if global_bs is None:
            warnings.warn("the datamodule has no batch_size: using the lr without linear scaling", stacklevel=2)
            return 1.0
        return global_bs / self.base_batch_size

    def attached_trainer(self) -> pl.Trainer | None:
        """The trainer running this module, or None (the module is used on its own, e.g. in a notebook)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's public ``trainer`` property raises while no trainer is attached
            return None

    def setup(self, stage: str) -> None:
        if self.load_from is not None:
            self.load_pretrained(stage)
        # HTC's semantic branch learns from COCO-Stuff maps; without them its loss has no target.
        dm = getattr(self.attached_trainer(), "datamodule", None)
        if (stage == "fit" and self.detector.with_semantic and dm is not None
                and getattr(dm, "has_semantic", True) is False):
            raise ValueError(
                "this detector has HTC's semantic branch, which trains on COCO-Stuff label maps, but the data module "
                "loads none: set data.init_args.stuff_maps (e.g. 'stuffthingmaps'), or train a config without it, "
                "configs/htc/htc-without-semantic_r50_fpn_1x_coco.yaml (tiny: configs/tiny/htc-without-semantic_tiny_"
                "coco.yaml), or add --model.init_args.detector.init_args.roi_head.init_args.semantic_head null")

    def load_pretrained(self, stage: str) -> None:
        """``load_from``: weights only, before the stage runs; a resumed run's ``ckpt_path`` wins."""
        from .checkpoints.mmdet import load_weights

        trainer = self.attached_trainer()
        ckpt_path = self.resume_ckpt_path or (trainer.ckpt_path if trainer is not None else None)
        if ckpt_path:
            rank_zero_info(f"load_from {self.load_from} skipped: the weights come from ckpt_path {ckpt_path}")
            return
        self.load_report = load_weights(self.detector, self.load_from, self.load_from_format,
                                        allow_new_classes=stage == "fit")
        rank_zero_info(self.load_report.format(f"load_from {self.load_from}"))

    def configure_optimizers(self) -> dict[str, Any] | tuple[list, list]:
        if self.param_group_rules or self.norm_decay_mult is not None or self.bias_decay_mult is not None:
            params = build_param_groups(self.detector, self.param_group_rules, self.norm_decay_mult,
                                        self.bias_decay_mult)
        else:
            params = [p for p in self.detector.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=self.scaled_lr(), momentum=self.momentum,
                                        weight_decay=self.weight_decay)
        else:
            optimizer = self.optimizer_factory(params)
            scale = self.lr_scale()
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * scale
        for group in optimizer.param_groups:  # a group's multipliers act on what the optimiser made of its defaults
            group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
            if "weight_decay" in group:
                group["weight_decay"] = group["weight_decay"] * group.get("decay_mult", 1.0)
        # mmdet 3.x's pair: LinearLR by iteration, then MultiStepLR by epoch (or the configured scheduler); both are
        # chainable (each multiplies the current lr), so their factors compose, also when the warm-up crosses an epoch.
        # The warm-up reaches the full lr at step warmup_iters, as mmdet 2.x's (3.x's LinearLR(end=500) at step 499).
        schedulers = []
        if self.warmup_iters > 0:
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=self.warmup_ratio, end_factor=1.0,
                                                       total_iters=self.warmup_iters)
            schedulers.append({"scheduler": warmup, "interval": "step", "name": "warmup"})
        if self.lr_scheduler_factory is None:
            decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.max_epochs_schedule, self.gamma)
            schedulers.append({"scheduler": decay, "interval": "epoch"})
        else:
            schedulers.append({"scheduler": self.lr_scheduler_factory(optimizer), "interval": self.scheduler_interval})
        return [optimizer], schedulers

    # -- evaluation --------------------------------------------------------------------------------------

    def default_iou_types(self) -> tuple[str, ...]:
        if self.iou_types is not None:
            return self.iou_types
        if self.detector.roi_head is None:
            return ("proposal",)
        return ("bbox", "segm") if self.detector.with_mask else ("bbox",)

    def build_evaluator(self, stage: Literal["val", "test"]):
        """A CocoEvaluator for ``stage`` from the datamodule's annotation file, or None (no metrics)."""
        from .evaluation.coco import CocoEvaluator

        dm = getattr(self.trainer, "datamodule", None)
        ann_file = getattr(dm, f"{stage}_ann_file", None)
        if ann_file is None and stage == "test":
            ann_file = getattr(dm, "val_ann_file", None)
        cat_ids = getattr(dm, "cat_ids", None)
        prefix = None if self.outfile_prefix is None else f"{self.outfile_prefix}.{stage}"
        if prefix is None and stage == "test" and self.attached_trainer() is not None:
            # detectron2's habit: a test run leaves its COCO results next to its logs
            prefix = str(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "results.test")
        if ann_file is None and (prefix is None or cat_ids is None):
            _warning_cache.warn(f"no {stage}_ann_file on the datamodule: {stage} metrics are not computed")
            return None
        evaluator = CocoEvaluator(None if ann_file is None else str(ann_file),
                                  None if cat_ids is None else list(cat_ids), iou_types=self.default_iou_types(),
                                  backend=self.backend, outfile_prefix=prefix, classwise=self.classwise)
        return evaluator.to(self.device)  # its states sync across ranks with the process group's device

    def predict_batch(self, batch: Batch) -> tuple[list[Detections], list[ImageMeta]]:
        images, targets = batch
        metas = [t["meta"] for t in targets]
        if self.tta is not None:
            return self.tta.predict(self.detector, images, metas), metas
        return self.detector.predict(images, metas), metas

    def _eval_step(self, batch: Batch, batch_idx: int) -> list[Detections]:
        detections, metas = self.predict_batch(batch)
        if self._evaluator is not None:
            self._evaluator.update(detections, metas)
        return detections

    def _eval_epoch_end(self, stage: str) -> None:
        if self._evaluator is None:
            return
        metrics = self._evaluator.compute()  # a collective under DDP: same numbers on every rank
        self.written_results = list(self._evaluator.written_files)
        self._evaluator.reset()
        if self.written_results and stage == "test":
            rank_zero_info("COCO results written: " + ", ".join(self.written_results))
        if self._evaluator.classwise_table and stage == "test":
            rank_zero_info("per-category AP (test):\n" + self._evaluator.classwise_table)
        if metrics:
            # compute() already gathered every rank's images, so all ranks hold the same numbers; the "max"
            # reduction keeps them bit-exact (a mean could round) and tells Lightning they are synchronised.
            self.log_dict({f"{stage}/{k}": float(v) for k, v in metrics.items()}, sync_dist=True, reduce_fx="max")

    def on_validation_epoch_start(self) -> None:
        self._evaluator = self.build_evaluator("val")
        self._images_logged = 0

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        detections = self._eval_step(batch, batch_idx)
        if self._images_logged < self.log_images and self.trainer.is_global_zero \
                and not self.trainer.sanity_checking:
            self.log_validation_images(batch, detections)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._evaluator = self.build_evaluator("test")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[Detections]:
        return self.predict_batch(batch)[0]

    # -- validation images -------------------------------------------------------------------------------

    def log_validation_images(self, batch: Batch, detections: list[Detections]) -> None:
        """Draw detections on the first validation images: TensorBoard if present, else PNGs in the log dir."""
        from .visualize import draw_detections, tensor_to_pil

        logger = self.logger
        if logger is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        # a datamodule without mean/std is taken to normalise as mmdet does
        mean, std = getattr(dm, "mean", IMAGENET_MEAN), getattr(dm, "std", IMAGENET_STD)
        names = getattr(dm, "class_names", None)
        images, targets = batch
        for image, target, det in zip(images, targets, detections):
            if self._images_logged >= self.log_images:
                break
            pil = tensor_to_pil(image, target["meta"], mean, std)
            drawn = draw_detections(pil, det.to("cpu"), class_names=names, score_thr=self.score_thr_vis)
            tag = f"val/image_{self._images_logged}"
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                import numpy as np
                experiment.add_image(tag, np.asarray(drawn), self.global_step, dataformats="HWC")
            elif getattr(logger, "log_dir", None):
                out = Path(logger.log_dir) / "val_images"
                out.mkdir(parents=True, exist_ok=True)
                drawn.save(out / f"step{self.global_step:07d}_{self._images_logged}.png")
            self._images_logged += 1


_warning_cache = WarningCache()  # a missing annotation file is said once per process, not once per stage run
