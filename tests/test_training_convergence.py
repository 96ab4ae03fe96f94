"""Tiny detectors learn the synthetic shapes from scratch on CPU: the summed ``loss*`` terms fall.

Each test builds a detector from its ``configs/tiny/`` YAML, trains it with a plain loop (SGD with momentum, a
linear warm-up and gradient clipping, batch 2, 128 px, fixed seeds) on a synthetic COCO split generated once
for the module, and compares the mean total loss of the first and last iterations. The batches are decoded
once (no flip) and cycled in a fixed order, so a run is repeatable.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from htc_lightning.data.datamodule import CocoDataModule
from htc_lightning.data.synthetic import THING_CLASSES, make_synthetic_coco
from htc_lightning.tools.mmdet_parity import build_detector

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
NUM_CLASSES = len(THING_CLASSES)
WINDOW = 10  # iterations averaged at each end of a run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are too small to gain from intra-op threads; one thread keeps the CPU time low on a shared
    # machine (idle OpenMP workers spin) and the float reductions, hence the run, the same everywhere.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> list[tuple[torch.Tensor, list[dict]]]:
    root = make_synthetic_coco(tmp_path_factory.mktemp("convergence"), num_train=40, num_val=2, seed=0,
                               image_size=(128, 128))
    dm = CocoDataModule(str(root), stuff_maps="stuffthingmaps", train_scales=[(128, 128)], test_scale=(128, 128),
                        flip_prob=0.0, batch_size=2, num_workers=0, seed=0)
    dm.setup("fit")
    return list(dm.train_dataloader())


def build(config: str, *overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(str(TINY / config), overrides)


def train(detector: torch.nn.Module, batches: list, iters: int, lr: float = 0.02, warmup: int = 50,
          max_norm: float = 20.0) -> dict[str, list[float]]:
    """Per-iteration history of every loss term and of their sum (``"total"``)."""
    torch.manual_seed(0)
    detector.train()
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    history: dict[str, list[float]] = {}
    for it in range(iters):
        # mmdet's linear warm-up, from 0.1 x lr; from-scratch tiny models diverge without it and the clipping
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, 0.1 + 0.9 * it / warmup)
        images, targets = batches[it % len(batches)]
        losses = detector.loss(images, targets)
        total = torch.stack([v.sum() for v in losses.values()]).sum()
        for name, value in [*losses.items(), ("total", total)]:
            history.setdefault(name, []).append(float(value.detach()))
        if not math.isfinite(history["total"][-1]):
            pytest.fail(f"iteration {it}: non-finite loss {({k: v[-1] for k, v in history.items()})}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
    return history


def first_and_last(values: list[float]) -> tuple[float, float]:
    return sum(values[:WINDOW]) / WINDOW, sum(values[-WINDOW:]) / WINDOW


def test_tiny_cascade_mask_rcnn_loss_halves_in_200_iterations(batches):
    detector = build("cascade_tiny_synthetic.yaml", f"num_classes={NUM_CLASSES}")
    assert detector.roi_head.interleaved is False and detector.roi_head.mask_info_flow is False
    first, last = first_and_last(train(detector, batches, 200)["total"])
    assert last < 0.5 * first, f"Cascade Mask R-CNN loss {first:.3f} -> {last:.3f}"


def test_tiny_htc_with_semantic_branch_loss_halves_in_200_iterations(batches):
    detector = build("htc_tiny_synthetic.yaml", f"num_classes={NUM_CLASSES}")
    assert detector.with_semantic
    history = train(detector, batches, 200)
    first, last = first_and_last(history["total"])
    assert last < 0.5 * first, f"HTC loss {first:.3f} -> {last:.3f}"
    sem_first, sem_last = first_and_last(history["loss_semantic_seg"])
    assert sem_last < 0.5 * sem_first, f"HTC semantic loss {sem_first:.3f} -> {sem_last:.3f}"


def test_tiny_ga_rpn_loss_falls(batches):
    detector = build("ga_rpn_tiny_synthetic.yaml")
    assert detector.roi_head is None
    # 120 iterations: the location term's focal loss still spikes now and then around iteration 60-80 (one
    # iteration at 36 in a 10-iteration window), which says nothing about learning; by 120 it has settled
    history = train(detector, batches, 120)
    first, last = first_and_last(history["total"])
    assert last < 0.5 * first, f"GA-RPN loss {first:.3f} -> {last:.3f}"
    # the location term alone could fall by moving its bias; the objectness of the guided anchors must learn too
    cls_first, cls_last = first_and_last(history["loss_rpn_cls"])
    assert cls_last < 0.7 * cls_first, f"GA-RPN objectness loss {cls_first:.3f} -> {cls_last:.3f}"


def test_tiny_htc_on_fishnet99_loss_falls_by_40_percent_in_80_iterations(batches):
    # the fall is measured from the random initialisation's loss, which depends on the draw (7.4 with today's
    # construction order, 10.5 before); the loss reached is the same (4.2 at iteration 60 either way)
    detector = build("htc_fishnet99_tiny_synthetic.yaml", f"num_classes={NUM_CLASSES}")
    assert type(detector.backbone).__name__ == "FishNet" and detector.backbone.depth == 99
    first, last = first_and_last(train(detector, batches, 80)["total"])
    assert last < 0.6 * first, f"HTC FishNet-99 loss {first:.3f} -> {last:.3f}"
