"""``classwise``: each category's AP and AP50 (bbox and segm), as pycocotools computes them restricted to that
category; the mean over the categories with ground truth is COCO's mAP; a table is printed at ``test``."""
from __future__ import annotations

import contextlib
import io
import json
import logging

import pytest
import torch
from _real28 import COCO_TINY_28, real_htc_config
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from htc_lightning.cli import HTCLightningCLI
from htc_lightning.evaluation.coco import CocoEvaluator, classwise_table
from htc_lightning.structures import Detections

ANN = COCO_TINY_28 / "annotations" / "instances_val2017.json"


def _ground_truth_as_detections(drop_category: int, jitter: float) -> tuple[list[Detections], list[dict]]:
    """Every ground-truth object of the real photographs as a detection (boxes shifted by ``jitter`` px, masks
    the ground truth's), except those of ``drop_category`` (missed)."""
    gt = COCO(str(ANN))
    cat_ids = sorted(gt.getCatIds())
    dets, metas = [], []
    g = torch.Generator().manual_seed(0)
    for image_id in sorted(gt.getImgIds()):
        info = gt.loadImgs(image_id)[0]
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if a["category_id"] != drop_category]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes += jitter * torch.randn(boxes.shape, generator=g)
        masks = torch.stack([torch.from_numpy(gt.annToMask(a)) for a in anns]).bool() if anns else \
            torch.zeros(0, info["height"], info["width"], dtype=torch.bool)
        labels = torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
        dets.append(Detections(boxes, torch.rand(len(anns), generator=g) * 0.5 + 0.5, labels, masks))
        metas.append({"image_id": image_id, "orig_size": (info["height"], info["width"])})
    return dets, metas


def _pycocotools_ap(gt: COCO, results: list[dict], iou_type: str, cat_id: int) -> tuple[float, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iou_type)  # loadRes adds keys to its input
        ev.params.catIds = [cat_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_each_category_gets_the_ap_pycocotools_computes_for_it_alone(tmp_path, backend):
    dets, metas = _ground_truth_as_detections(drop_category=18, jitter=4.0)  # every dog missed
    evaluator = CocoEvaluator(str(ANN), classwise=True, backend=backend, outfile_prefix=str(tmp_path / "r"))
    evaluator.update(dets, metas)
    metrics = evaluator.compute()
    gt = COCO(str(ANN))
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    present = sorted({a["category_id"] for a in gt.loadAnns(gt.getAnnIds())})
    for iou_type in ("bbox", "segm"):
        results = json.loads((tmp_path / f"r.{iou_type}.json").read_text())
        for cat_id in present:
            key = "_".join(names[cat_id].split())
            ap, ap50 = _pycocotools_ap(gt, results, iou_type, cat_id)
            assert metrics[f"{iou_type}_AP_{key}"] == pytest.approx(ap, abs=1e-9)
            assert metrics[f"{iou_type}_AP50_{key}"] == pytest.approx(ap50, abs=1e-9)
        assert metrics[f"{iou_type}_AP_dog"] == 0.0  # missed, not undefined
        assert metrics[f"{iou_type}_AP_toothbrush"] == -1.0  # no toothbrush in these photographs
        # COCO's mAP is the mean over the categories with ground truth
        defined = [metrics[f"{iou_type}_AP_{'_'.join(names[c].split())}"] for c in present]
        assert metrics[f"{iou_type}_mAP"] == pytest.approx(sum(defined) / len(defined), abs=1e-9)
    assert "dog" in evaluator.classwise_table and "bbox AP50" in evaluator.classwise_table


def test_without_classwise_only_the_summary_is_returned():
    dets, metas = _ground_truth_as_detections(drop_category=18, jitter=0.0)
    evaluator = CocoEvaluator(str(ANN))
    evaluator.update(dets, metas)
    metrics = evaluator.compute()
    assert not [k for k in metrics if "_AP_" in k] and evaluator.classwise_table == ""


def test_the_table_marks_undefined_categories_and_aligns_columns():
    table = classwise_table({"bbox": {"person": (0.5, 0.75), "traffic light": (-1.0, -1.0)}})
    lines = table.splitlines()
    assert lines[0].split() == ["category", "bbox", "AP", "bbox", "AP50"]
    assert lines[2].split() == ["person", "0.500", "0.750"]
    assert lines[3].split()[-2:] == ["-", "-"] and lines[3].startswith("traffic light")
    assert len({len(line) for line in (lines[0], lines[2], lines[3])}) == 1


def test_cli_test_prints_the_table_and_logs_per_category_ap(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # the table is Lightning's rank-zero info log
    config = real_htc_config(tmp_path, max_steps=1, limit_val_batches=0)
    HTCLightningCLI(args=["fit", "--config", config])
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    tested = HTCLightningCLI(args=["test", "--config", config, "--ckpt_path", ckpt,
                                   "--model.init_args.classwise", "true"])
    out = caplog.text
    assert "per-category AP (test):" in out and "teddy bear" in out
    logged = tested.trainer.callback_metrics
    assert {"test/bbox_AP_person", "test/segm_AP50_teddy_bear", "test/bbox_mAP"} <= set(logged)


def test_an_epoch_without_detections_gives_zero_per_category_not_missing_keys():
    dets, metas = _ground_truth_as_detections(drop_category=18, jitter=0.0)
    empty = [Detections(d.boxes[:0], d.scores[:0], d.labels[:0], d.masks[:0]) for d in dets]
    evaluator = CocoEvaluator(str(ANN), classwise=True)
    evaluator.update(empty, metas)
    with pytest.warns(UserWarning, match="no detections"):
        metrics = evaluator.compute()
    assert metrics["bbox_AP_person"] == 0.0 and metrics["segm_AP_toothbrush"] == -1.0
