"""``predict`` output: COCO json with original category ids, drawn PNGs; the drawing itself."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyCocoDataModule, make_detector
from PIL import Image
from pycocotools.coco import COCO

from htc_lightning.callbacks import CocoPredictionWriter
from htc_lightning.module import DetectionModule
from htc_lightning.structures import Detections
from htc_lightning.visualize import draw_detections, label_color, tensor_to_pil


def run_predict(tmp_path, draw: bool, with_mask: bool = True):
    dm = TinyCocoDataModule(str(tmp_path / "data"))
    writer = CocoPredictionWriter(str(tmp_path / "out"), draw=draw, score_thr=0.0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    module = DetectionModule(make_detector(init_offset=0.0, with_mask=with_mask))
    trainer.predict(module, dm, return_predictions=False)
    return dm, tmp_path / "out"


def test_predict_writes_coco_results_with_original_category_ids(tmp_path):
    dm, out = run_predict(tmp_path, draw=False)
    gt = COCO(dm.val_ann_file)
    for iou_type in ("bbox", "segm"):
        results = json.loads((out / f"predictions.{iou_type}.json").read_text())
        assert {r["category_id"] for r in results} <= set(dm.cat_ids)
        dt = gt.loadRes(str(out / f"predictions.{iou_type}.json"))
        assert sorted(dt.getImgIds()) == sorted(gt.getImgIds())
    # the fake detector returns the ground truth: every gt box comes back with its category
    results = json.loads((out / "predictions.bbox.json").read_text())
    def key(entry):
        return (entry["image_id"], entry["category_id"], *[round(v, 3) for v in entry["bbox"]])

    assert sorted(map(key, results)) == sorted(map(key, gt.dataset["annotations"]))
    images = json.loads((out / "images.json").read_text())
    assert {i["file_name"] for i in images} == {im["file_name"] for im in gt.dataset["images"]}


def test_box_only_model_writes_no_segm_file(tmp_path):
    _, out = run_predict(tmp_path, draw=False, with_mask=False)
    assert (out / "predictions.bbox.json").exists() and not (out / "predictions.segm.json").exists()


def test_predict_draws_one_png_per_image_when_asked(tmp_path):
    dm, out = run_predict(tmp_path, draw=True)
    pngs = sorted((out / "vis").glob("*.png"))
    assert [p.name for p in pngs] == sorted(i["target"]["meta"]["file_name"] for i in dm.val_items)
    assert Image.open(pngs[0]).size == (64, 64)


def test_draw_detections_tints_masks_outlines_boxes_and_skips_low_scores():
    image = Image.new("RGB", (80, 60))
    masks = torch.zeros(2, 60, 80, dtype=torch.bool)
    masks[0, 10:40, 10:40] = True
    masks[1, 50:60, 60:80] = True
    det = Detections(torch.tensor([[8.0, 8.0, 42.0, 42.0], [60.0, 50.0, 79.0, 59.0]]), torch.tensor([0.9, 0.1]),
                     torch.tensor([1, 0]), masks)
    drawn = np.asarray(draw_detections(image, det, class_names=["a", "b"], score_thr=0.5, mask_alpha=0.5))
    expected = (np.array(label_color(1)) * 0.5).round()
    np.testing.assert_allclose(drawn[35, 35], expected, atol=1)  # inside mask 0, below its label: half the colour
    assert tuple(drawn[41, 25]) == label_color(1)  # box outline (bottom edge, 2 px wide)
    assert tuple(drawn[12, 10]) == label_color(1)  # the label's background, inside the box's top-left corner
    assert drawn[55, 70].sum() == 0  # the 0.1-score detection is not drawn
    assert drawn[55, 2].sum() == 0  # background untouched


def test_where_masks_overlap_the_smaller_one_is_drawn_on_top_not_black():
    masks = torch.zeros(2, 60, 80, dtype=torch.bool)
    masks[0, 30:50, 40:60] = True  # a small object in front of a large one, less confident than it
    masks[1, 5:55, 5:75] = True
    det = Detections(torch.tensor([[40.0, 30.0, 60.0, 50.0], [5.0, 5.0, 75.0, 55.0]]), torch.tensor([0.6, 0.8]),
                     torch.tensor([1, 2]), masks)
    drawn = np.asarray(draw_detections(Image.new("RGB", (80, 60), (100, 100, 100)), det, mask_alpha=0.5))
    for (y, x), label in (((45, 55), 1), ((52, 10), 2)):
        np.testing.assert_allclose(drawn[y, x], (50 + np.array(label_color(label)) * 0.5).round(), atol=1)


def test_draw_detections_rejects_masks_in_another_frame():
    det = Detections(torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.long),
                     torch.ones(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match the image"):
        draw_detections(Image.new("RGB", (10, 10)), det, score_thr=0.0)


def test_tensor_to_pil_undoes_normalisation_padding_and_resize():
    original = torch.arange(3 * 4 * 6, dtype=torch.float32).view(3, 4, 6) % 255
    mean, std = (10.0, 20.0, 30.0), (2.0, 3.0, 4.0)
    normalised = (original - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    padded = torch.zeros(3, 8, 8)
    padded[:, :4, :6] = normalised
    pil = tensor_to_pil(padded, {"img_size": (4, 6), "orig_size": (4, 6)}, mean, std)
    np.testing.assert_allclose(np.asarray(pil), original.permute(1, 2, 0).numpy(), atol=0.51)
    assert tensor_to_pil(padded, {"img_size": (4, 6), "orig_size": (8, 12)}, mean, std).size == (12, 8)
