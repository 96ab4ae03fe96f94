"""Real COCO 2017 photographs and annotations (tests/fixtures/coco_tiny: 4 train + 2 val images, COCO's 80
categories with their non-contiguous ids, multi-part polygons, a crowd RLE): loading, evaluation against plain
pycocotools, and the CLI's fit / test / predict with configs/tiny/htc-without-semantic_tiny_coco.yaml."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from htc_lightning.data.coco import CocoDetection, ImageFolder
from htc_lightning.data.datamodule import CocoDataModule
from htc_lightning.evaluation.coco import DET_STAT_NAMES, CocoEvaluator
from htc_lightning.structures import Detections

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "tests" / "fixtures" / "coco_tiny"
TRAIN_ANN = ROOT / "annotations" / "instances_train2017.json"
VAL_ANN = ROOT / "annotations" / "instances_val2017.json"
CONFIG = REPO / "configs" / "tiny" / "htc-without-semantic_tiny_coco.yaml"


def annotations(path: Path) -> dict:
    return json.loads(path.read_text())


# -- loading -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ann_file, images", [(TRAIN_ANN, "train2017"), (VAL_ANN, "val2017")])
def test_every_image_and_annotation_is_kept(ann_file, images):
    data = annotations(ann_file)
    ds = CocoDetection(ann_file, ROOT / images)
    assert ds.image_ids == sorted(i["id"] for i in data["images"])
    kept = 0
    for i in range(len(ds)):
        _, target = ds.load(i)
        assert len(target["labels"]) == len(target["boxes"]) == len(target["masks"])
        kept += len(target["labels"]) + len(target["crowd_boxes"])
    assert kept == len(data["annotations"])


def test_labels_are_contiguous_and_map_back_to_cocos_category_ids():
    data = annotations(TRAIN_ANN)
    ds = CocoDetection(TRAIN_ANN, ROOT / "train2017")
    assert len(ds.cat_ids) == 80 and ds.cat_ids[-1] == 90  # COCO's ids have gaps (no 12, 26, ...)
    names = {c["id"]: c["name"] for c in data["categories"]}
    for i in range(len(ds)):
        info, anns = ds.records[i]
        _, target = ds.load(i)
        expected = [a["category_id"] for a in anns if not a["iscrowd"]]
        assert [ds.cat_ids[label] for label in target["labels"].tolist()] == expected
        assert [ds.class_names[label] for label in target["labels"].tolist()] == [names[c] for c in expected]


def test_a_multi_part_polygon_is_one_mask_holding_every_part():
    gt = COCO(str(TRAIN_ANN))
    ann = gt.loadAnns([1490296])[0]  # three polygon parts
    assert len(ann["segmentation"]) == 3
    ds = CocoDetection(TRAIN_ANN, ROOT / "train2017")
    index = ds.image_ids.index(ann["image_id"])
    _, target = ds.load(index)
    things = [a for a in ds.records[index][1] if not a["iscrowd"]]
    mask = target["masks"][[a["id"] for a in things].index(ann["id"])].numpy()
    assert np.array_equal(mask, gt.annToMask(ann))
    for part in ann["segmentation"]:  # each part alone is inside the mask
        info = gt.loadImgs(ann["image_id"])[0]
        alone = mask_utils.decode(mask_utils.frPyObjects([part], info["height"], info["width"]))[..., 0]
        assert alone.sum() > 0 and (mask[alone > 0] == 1).all()


def test_a_crowd_region_becomes_a_crowd_box_not_an_object():
    data = annotations(TRAIN_ANN)
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and isinstance(crowd[0]["segmentation"]["counts"], list)  # uncompressed RLE
    ds = CocoDetection(TRAIN_ANN, ROOT / "train2017")
    index = ds.image_ids.index(crowd[0]["image_id"])
    _, target = ds.load(index)
    x, y, w, h = crowd[0]["bbox"]
    assert torch.allclose(target["crowd_boxes"], torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32))
    objects = [a for a in data["annotations"] if a["image_id"] == crowd[0]["image_id"] and not a["iscrowd"]]
    assert len(target["labels"]) == len(objects)


# -- evaluation ----------------------------------------------------------------------------------------------

def noisy_detections(ann_file: Path, seed: int = 0) -> tuple[list[Detections], list[dict], list[dict], list[dict]]:
    """Detections made from the real ground truth by jittering boxes, eroding/dilating masks, swapping some
    labels, dropping some objects and adding false positives; also as COCO result lists for pycocotools."""
    rng = np.random.default_rng(seed)
    gt = COCO(str(ann_file))
    cat_ids = sorted(gt.getCatIds())
    dets, metas, bbox_results, segm_results = [], [], [], []
    for image_id in sorted(gt.getImgIds()):
        info = gt.loadImgs(image_id)[0]
        h, w = info["height"], info["width"]
        boxes, scores, labels, masks = [], [], [], []
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=image_id, iscrowd=False)):
            if rng.random() < 0.15:
                continue  # missed
            x, y, bw, bh = ann["bbox"]
            jitter = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
            x0, y0 = np.clip([x + jitter[0], y + jitter[1]], 0, [w - 2, h - 2])
            x1, y1 = np.clip([x + bw + jitter[2], y + bh + jitter[3]], [x0 + 1, y0 + 1], [w, h])
            mask = torch.from_numpy(gt.annToMask(ann)).float()[None, None]
            grown = torch.nn.functional.max_pool2d(mask, 5, 1, 2) if rng.random() < 0.5 else \
                -torch.nn.functional.max_pool2d(-mask, 3, 1, 1)
            label = cat_ids.index(ann["category_id"])
            if rng.random() < 0.1:
                label = int(rng.integers(len(cat_ids)))
            boxes.append([x0, y0, x1, y1])
            scores.append(rng.uniform(0.05, 1.0))
            labels.append(label)
            masks.append(grown[0, 0] > 0.5)
        for _ in range(3):  # false positives
            x0, y0 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            x1, y1 = x0 + rng.uniform(4, w * 0.3), y0 + rng.uniform(4, h * 0.3)
            box_mask = torch.zeros(h, w, dtype=torch.bool)
            box_mask[int(y0):int(y1), int(x0):int(x1)] = True
            boxes.append([x0, y0, x1, y1])
            scores.append(rng.uniform(0.05, 0.6))
            labels.append(int(rng.integers(len(cat_ids))))
            masks.append(box_mask)
        det = Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32),
                         torch.tensor(labels), torch.stack(masks))
        dets.append(det)
        metas.append({"image_id": image_id, "orig_size": (h, w)})
        for box, score, label, mask in zip(det.boxes.double().tolist(), det.scores.double().tolist(),
                                           det.labels.tolist(), det.masks):
            category = cat_ids[label]
            bbox_results.append({"image_id": image_id, "category_id": category, "score": score,
                                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            segm_results.append({"image_id": image_id, "category_id": category, "score": score,
                                 "segmentation": rle})
    return dets, metas, bbox_results, segm_results


def pycocotools_stats(ann_file: Path, results: list[dict], iou_type: str) -> list[float]:
    gt = COCO(str(ann_file))
    ev = COCOeval(gt, gt.loadRes(results), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(v) for v in ev.stats]


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("ann_file", [TRAIN_ANN, VAL_ANN], ids=["train", "val"])
def test_ap_equals_plain_pycocotools_on_real_ground_truth(ann_file, backend):
    dets, metas, bbox_results, segm_results = noisy_detections(ann_file)
    evaluator = CocoEvaluator(str(ann_file), backend=backend)
    evaluator.update(dets, metas)
    ours = evaluator.compute()
    for iou_type, results in (("bbox", bbox_results), ("segm", segm_results)):
        reference = pycocotools_stats(ann_file, results, iou_type)
        assert 0.2 < reference[0] < 0.95  # noisy enough to exercise the matching, not a trivial 0 or 1
        for name, value in zip(DET_STAT_NAMES, reference):
            assert abs(ours[f"{iou_type}_{name}"] - value) <= 1e-12, (iou_type, name, ours[f"{iou_type}_{name}"], value)


# -- predict inputs ------------------------------------------------------------------------------------------

def test_coco_file_names_give_coco_image_ids():
    folder = ImageFolder(ROOT / "val2017")
    assert folder.image_ids == [223747, 404484]
    _, target = folder[1]
    assert target["meta"]["image_id"] == 404484 and target["meta"]["file_name"] == "000000404484.jpg"


def test_other_file_names_give_positions_and_one_file_is_accepted(tmp_path):
    for name in ("b.jpg", "000000000001.jpg"):
        (tmp_path / name).write_bytes((ROOT / "val2017" / "000000404484.jpg").read_bytes())
    assert ImageFolder(tmp_path).image_ids == [0, 1]  # one name is not a COCO id: positions for all
    single = ImageFolder(tmp_path / "000000000001.jpg")
    assert len(single) == 1 and single.image_ids == [1]


def test_a_missing_predict_path_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope is neither an image file nor a folder"):
        ImageFolder(tmp_path / "nope")


# -- stuff maps ----------------------------------------------------------------------------------------------

def test_missing_stuff_maps_fail_at_setup_naming_the_folder_and_both_fixes():
    dm = CocoDataModule(str(ROOT), stuff_maps="stuffthingmaps", num_workers=0)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert f"COCO-Stuff maps folder {ROOT.resolve() / 'stuffthingmaps' / 'train2017'} does not exist" in message
    assert "Either provide them" in message and "configs/tiny/htc-without-semantic_tiny_coco.yaml" in message


def test_evaluation_never_reads_stuff_maps():
    dm = CocoDataModule(str(ROOT), stuff_maps="stuffthingmaps", test_scale=(64, 64), num_workers=0)
    dm.setup("validate")
    dm.setup("test")
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        _, targets = next(iter(loader))
        assert "semantic" not in targets[0]


# -- the CLI -------------------------------------------------------------------------------------------------

def test_cli_semantic_head_null_switches_the_branch_off():
    from htc_lightning.cli import HTCLightningCLI

    semantic = REPO / "configs" / "tiny" / "htc_tiny_synthetic.yaml"
    cli = HTCLightningCLI(args=["--config", str(semantic), "--data.init_args.data_root", str(ROOT),
                                "--data.init_args.stuff_maps", "null",
                                "--model.init_args.detector.init_args.roi_head.init_args.semantic_head", "null"],
                          run=False)
    assert cli.model.detector.roi_head.semantic_head is None
    assert cli.model.detector.roi_head.num_classes == 80  # linked from the annotation file
    assert cli.model.detector.roi_head.bbox_head[0].num_classes == 80


def test_cli_fit_test_predict_round_trip_on_real_photographs(tmp_path, capsys):
    from htc_lightning.cli import main

    run = tmp_path / "run"
    common = ["--config", str(CONFIG), "--data.init_args.data_root", str(ROOT), "--data.init_args.num_workers", "0",
              "--data.init_args.train_scales", "[[96, 96]]", "--data.init_args.test_scale", "[96, 96]",
              "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              # an untrained model's class scores are about 1/81: keep them, so that there is something to write
              "--model.init_args.detector.init_args.roi_head.init_args.score_thr", "0.0"]
    main(["fit", *common, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--data.init_args.batch_size", "2"])
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 2

    main(["test", *common, "--ckpt_path", str(last)])
    written = sorted(run.glob("results.test.*.json"))
    assert [p.name for p in written] == ["results.test.bbox.json", "results.test.segm.json"]
    capsys.readouterr()

    image = ROOT / "val2017" / "000000404484.jpg"
    main(["predict", *common, "--ckpt_path", str(last), "--data.init_args.predict_images", str(image),
          "--prediction_writer.draw", "true", "--prediction_writer.score_thr", "0.0"])
    printed = capsys.readouterr().out
    out = run / "predictions"  # the run's log directory (no logger: default_root_dir)
    images = json.loads((out / "images.json").read_text())
    assert images == [{"id": 404484, "file_name": image.name, "path": str(image.resolve()), "height": 240,
                       "width": 320}]
    for name in ("predictions.bbox.json", "predictions.segm.json", "images.json", "vis/000000404484.png"):
        assert (out / name).is_file() and str(out / name) in printed, (name, printed)
    results = json.loads((out / "predictions.bbox.json").read_text())
    assert results and {r["image_id"] for r in results} == {404484}
    assert f"drew {len(results)} of {len(results)} detection(s)" in printed
    assert {r["category_id"] for r in results} <= set(CocoDetection(VAL_ANN, ROOT / "val2017").cat_ids)
