"""CocoEvaluator is a torchmetrics Metric and scores detections as torchmetrics' own COCO mAP does."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision

from htc_lightning.evaluation import CocoEvaluator
from htc_lightning.structures import Detections

H, W = 48, 64
CAT_IDS = [2, 5, 9]


def _scene(seed: int, num_images: int = 12):
    """Ground-truth rectangles (with their masks) and detections: jittered copies with random masks cut out,
    plus false positives, so AP is neither 0 nor 1."""
    g = torch.Generator().manual_seed(seed)
    gts, dets = [], []
    for _ in range(num_images):
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([W - 20.0, H - 20.0])
        wh = 6 + torch.rand(n, 2, generator=g) * 14
        boxes = torch.cat([xy, xy + wh], 1).floor()
        labels = torch.randint(0, 3, (n,), generator=g)
        masks = torch.zeros(n, H, W, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = True
        gts.append((boxes, labels, masks))
        fp = 3
        det_boxes = torch.cat([boxes + torch.randn(n, 4, generator=g) * 1.5,
                               torch.cat([xy[:1].expand(fp, 2) + 3, xy[:1].expand(fp, 2) + 12], 1)])
        det_boxes = det_boxes.clamp(min=0)
        det_masks = torch.cat([masks & (torch.rand(n, H, W, generator=g) > 0.15),
                               torch.rand(fp, H, W, generator=g) > 0.9])
        scores = torch.rand(n + fp, generator=g)
        det_labels = torch.cat([labels, torch.randint(0, 3, (fp,), generator=g)])
        dets.append(Detections(det_boxes, scores, det_labels, det_masks))
    return gts, dets


def _write_ann(path, gts):
    images, anns = [], []
    for image_id, (boxes, labels, masks) in enumerate(gts, start=1):
        images.append({"id": image_id, "height": H, "width": W, "file_name": f"{image_id}.png"})
        for box, label, mask in zip(boxes.tolist(), labels.tolist(), masks):
            rle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            area = float(mask_util.area(rle))
            rle["counts"] = rle["counts"].decode()
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CAT_IDS[label], "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "segmentation": rle})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS]}))


def test_the_evaluator_is_a_torchmetrics_metric_with_list_states(tmp_path):
    gts, _ = _scene(0, 2)
    _write_ann(tmp_path / "gt.json", gts)
    evaluator = CocoEvaluator(str(tmp_path / "gt.json"))
    assert isinstance(evaluator, Metric)
    assert all(evaluator._reductions[name] is not None for name in ("image_ids", "boxes", "rle_bytes"))
    assert evaluator.image_ids == []


@pytest.mark.parametrize("seed", [0, 1])
def test_box_and_mask_ap_equal_torchmetrics_mean_average_precision(tmp_path, seed):
    gts, dets = _scene(seed)
    _write_ann(tmp_path / "gt.json", gts)
    ours = CocoEvaluator(str(tmp_path / "gt.json"), iou_types=("bbox", "segm"), backend="faster_coco_eval")
    # COCO's thresholds in float64: torchmetrics' defaults come from a float32 torch.linspace (0.550000011..,
    # 0.0099999998..), which moves its AP by ~1e-4 wherever a recall lands exactly on a threshold
    theirs = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="faster_coco_eval",
                                  iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
                                  rec_thresholds=np.linspace(0.0, 1.0, 101).tolist())
    metas = [{"image_id": i, "orig_size": (H, W)} for i in range(1, len(gts) + 1)]
    ours.update(dets, metas)
    theirs.update([{"boxes": d.boxes, "scores": d.scores, "labels": d.labels, "masks": d.masks} for d in dets],
                  [{"boxes": b, "labels": lab, "masks": m} for b, lab, m in gts])
    mine, ref = ours.compute(), theirs.compute()
    assert 0.05 < mine["bbox_mAP"] < 0.95 and 0.05 < mine["segm_mAP"] < 0.95
    for iou_type in ("bbox", "segm"):
        for name, key in (("mAP", "map"), ("mAP_50", "map_50"), ("mAP_75", "map_75")):
            assert mine[f"{iou_type}_{name}"] == pytest.approx(float(ref[f"{iou_type}_{key}"]), abs=1e-6), \
                (iou_type, name)
