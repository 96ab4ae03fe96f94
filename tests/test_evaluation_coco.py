"""CocoEvaluator: COCO bbox/segm AP and proposal AR on a tiny hand-made annotation file."""
import json
import warnings
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from htc_lightning.evaluation import CocoEvaluator, encode_masks, metric_names
from htc_lightning.structures import Detections

CAT_IDS = [1, 3, 7]  # non-contiguous on purpose: label i <-> CAT_IDS[i]
IMAGES = {1: (160, 200), 2: (96, 128), 5: (120, 80), 7: (64, 64)}  # id -> (h, w); 7 is never predicted


def _diamond(x, y, w, h):
    return [[x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]]


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _uncompressed_runs(mask):
    """COCO's uncompressed RLE (as used for crowd regions): column-major run lengths, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
    return [0] + runs if flat[0] else runs


def _write_gt(path):
    """Boxes of all three COCO size classes, polygon and RLE masks, one crowd region."""
    anns = []

    def add(image_id, cat, box, segmentation, iscrowd=0):
        h, w = IMAGES[image_id]
        if isinstance(segmentation, list):
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, h, w))
        else:
            rle = mask_util.frPyObjects(segmentation, h, w) if isinstance(segmentation["counts"], list) \
                else segmentation
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                     "segmentation": segmentation, "area": float(mask_util.area(rle)), "iscrowd": iscrowd})

    add(1, 1, [10, 20, 120, 110], _rect(10, 20, 120, 110))           # large
    add(1, 3, [140, 10, 40, 40], _rect(140, 10, 40, 40))             # medium
    add(1, 3, [150, 120, 20, 18], _diamond(150, 120, 20, 18))        # small
    add(2, 7, [5, 5, 50, 60], _rect(5, 5, 50, 60))
    blob = np.zeros(IMAGES[2], dtype=np.uint8, order="F")
    blob[40:80, 70:120] = 1
    blob[50:60, 90:100] = 0
    rle = mask_util.encode(blob)
    rle["counts"] = rle["counts"].decode()
    add(2, 1, [70, 40, 50, 40], rle)                                  # compressed RLE mask
    crowd = np.zeros(IMAGES[2], dtype=np.uint8, order="F")
    crowd[0:20, 100:128] = 1
    add(2, 3, [100, 0, 28, 20], {"size": list(IMAGES[2]), "counts": _uncompressed_runs(crowd)}, iscrowd=1)
    add(5, 7, [10, 10, 60, 90], _diamond(10, 10, 60, 90))
    add(5, 1, [30, 50, 12, 12], _rect(30, 50, 12, 12))
    add(7, 1, [5, 5, 30, 30], _rect(5, 5, 30, 30))
    gt = {"images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, (h, w) in IMAGES.items()],
          "categories": [{"id": c, "name": f"c{c}"} for c in reversed(CAT_IDS)],
          "annotations": anns}
    path.write_text(json.dumps(gt))
    return str(path)


@pytest.fixture
def ann_file(tmp_path):
    return _write_gt(tmp_path / "gt.json")


def _gt_detections(ann_file, image_ids=(1, 2, 5)):
    """Exactly the non-crowd ground truth of each image, as a model would return it."""
    coco = COCO(ann_file)
    dets, metas = [], []
    for image_id in image_ids:
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32)
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool()
        labels = torch.tensor([CAT_IDS.index(a["category_id"]) for a in anns])
        dets.append(Detections(boxes, torch.linspace(0.9, 0.5, len(anns)), labels, masks))
        metas.append({"image_id": image_id, "orig_size": IMAGES[image_id]})
    return dets, metas


def _perturbed_detections(ann_file, seed=0):
    """Ground truth shifted by a few pixels, with random scores, swapped labels and false positives."""
    g = torch.Generator().manual_seed(seed)
    dets, metas = _gt_detections(ann_file)
    out = []
    for det, meta in zip(dets, metas):
        h, w = meta["orig_size"]
        n = len(det)
        shift = torch.randint(-4, 5, (n, 2), generator=g)
        boxes = det.boxes + shift.repeat(1, 2).float()
        masks = torch.stack([torch.roll(m, (int(s[1]), int(s[0])), dims=(0, 1)) for m, s in zip(det.masks, shift)])
        fp = 6
        xy = torch.rand(fp, 2, generator=g) * torch.tensor([w - 20, h - 20])
        wh = 4 + torch.rand(fp, 2, generator=g) * 40
        fp_boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1)
        fp_masks = torch.zeros(fp, h, w, dtype=torch.bool)
        for i, (x1, y1, x2, y2) in enumerate(fp_boxes.round().long().tolist()):
            fp_masks[i, y1:y2, x1:x2] = True
        labels = torch.cat([det.labels, torch.randint(0, 3, (fp,), generator=g)])
        labels[0] = (labels[0] + 1) % 3  # one wrong class
        out.append(Detections(torch.cat([boxes, fp_boxes]), torch.rand(n + fp, generator=g),
                              labels, torch.cat([masks, fp_masks])))
    return out, metas


def _run(ann_file, dets, metas, **kwargs):
    evaluator = CocoEvaluator(ann_file, **kwargs)
    evaluator.update(dets, metas)
    return evaluator.compute()


def _cocoeval_stats(ann_file, results, iou_type, img_ids, use_cats=True, max_dets=None):
    gt = COCO(ann_file)
    coco_eval = COCOeval(gt, gt.loadRes(results), iou_type)
    coco_eval.params.imgIds = img_ids
    if not use_cats:
        coco_eval.params.useCats = 0
    if max_dets is not None:
        coco_eval.params.maxDets = list(max_dets)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return [float(s) for s in coco_eval.stats]


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_exact_ground_truth_scores_ap_one(ann_file, backend):
    metrics = _run(ann_file, *_gt_detections(ann_file), backend=backend)
    assert list(metrics) == metric_names(("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        for name in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_100"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(1.0), f"{iou_type}_{name}"


def test_backends_give_identical_numbers(ann_file):
    dets, metas = _perturbed_detections(ann_file)
    ref = _run(ann_file, dets, metas, backend="pycocotools")
    fast = _run(ann_file, dets, metas, backend="faster_coco_eval")
    assert 0.05 < ref["bbox_mAP"] < 0.95 and 0.05 < ref["segm_mAP"] < 0.95  # the perturbation makes AP non-trivial
    assert fast == pytest.approx(ref, abs=1e-12)


def test_equals_pycocotools_on_the_written_json(ann_file, tmp_path):
    dets, metas = _perturbed_detections(ann_file, seed=1)
    metrics = _run(ann_file, dets, metas, backend="faster_coco_eval", outfile_prefix=str(tmp_path / "out" / "val"))
    for iou_type in ("bbox", "segm"):
        direct = _cocoeval_stats(ann_file, str(tmp_path / "out" / f"val.{iou_type}.json"), iou_type, [1, 2, 5])
        ours = [metrics[name] for name in metric_names([iou_type])]
        assert ours == pytest.approx(direct, abs=1e-12), iou_type


def test_written_json_has_original_category_ids_and_string_rle(ann_file, tmp_path):
    dets, metas = _gt_detections(ann_file)
    _run(ann_file, dets, metas, outfile_prefix=str(tmp_path / "val"))
    bbox = json.loads((tmp_path / "val.bbox.json").read_text())
    segm = json.loads((tmp_path / "val.segm.json").read_text())
    assert len(bbox) == len(segm) == sum(len(d) for d in dets)
    expected = [CAT_IDS[label] for d in dets for label in d.labels.tolist()]
    assert [r["category_id"] for r in bbox] == expected == [r["category_id"] for r in segm]
    first = dets[0].boxes[0].tolist()
    assert bbox[0]["bbox"] == pytest.approx([first[0], first[1], first[2] - first[0], first[3] - first[1]])
    assert all(isinstance(r["segmentation"]["counts"], str) and "bbox" not in r for r in segm)


def test_only_images_passed_to_update_are_evaluated(ann_file):
    # Image 7 has a ground-truth object but was never predicted: it must not count as a miss.
    metrics = _run(ann_file, *_gt_detections(ann_file))
    assert metrics["bbox_AR_100"] == pytest.approx(1.0)


def test_an_image_seen_without_detections_counts_as_missed(ann_file):
    dets, metas = _gt_detections(ann_file)
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                       torch.zeros(0, *IMAGES[7], dtype=torch.bool))
    metrics = _run(ann_file, dets + [empty], metas + [{"image_id": 7}])
    assert metrics["bbox_AR_100"] < 1.0
    results = [r for d, m in zip(dets, metas) for r in _bbox_results(d, m["image_id"])]
    assert metrics["bbox_AR_100"] == pytest.approx(_cocoeval_stats(ann_file, results, "bbox", [1, 2, 5, 7])[8])


def _bbox_results(det, image_id):
    return [{"image_id": image_id, "category_id": CAT_IDS[label], "score": score,
             "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for (x1, y1, x2, y2), score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())]


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_proposal_recall_is_class_agnostic(ann_file, backend):
    dets, metas = _perturbed_detections(ann_file, seed=2)
    proposals = [Detections(d.boxes, d.scores, torch.zeros_like(d.labels)) for d in dets]
    metrics = _run(ann_file, proposals, metas, iou_types=("proposal",), backend=backend, proposal_nums=(2, 5, 1000))
    assert list(metrics) == ["AR@2", "AR@5", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000"]
    results = [r for d, m in zip(proposals, metas) for r in _bbox_results(d, m["image_id"])]
    direct = _cocoeval_stats(ann_file, results, "bbox", [1, 2, 5], use_cats=False, max_dets=(2, 5, 1000))
    assert list(metrics.values()) == pytest.approx(direct[6:12], abs=1e-12)
    assert metrics["AR@2"] < metrics["AR@1000"]


def test_no_detections_returns_zeros_with_a_warning(ann_file):
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                       torch.zeros(0, 160, 200, dtype=torch.bool))
    with pytest.warns(UserWarning, match="no detections"):
        metrics = _run(ann_file, [empty], [{"image_id": 1}])
    assert metrics == dict.fromkeys(metric_names(("bbox", "segm")), 0.0)


def test_repeated_image_keeps_its_first_predictions(ann_file):
    dets, metas = _gt_detections(ann_file)
    wrong = Detections(dets[0].boxes + 50, dets[0].scores, dets[0].labels, dets[0].masks)
    assert _run(ann_file, dets + [wrong], metas + [metas[0]]) == _run(ann_file, dets, metas)


def test_compute_does_not_consume_state_and_reset_clears_it(ann_file):
    evaluator = CocoEvaluator(ann_file, iou_types=("bbox",))
    evaluator.update(*_gt_detections(ann_file))
    first = evaluator.compute()
    assert evaluator.compute() == first
    evaluator.reset()
    with pytest.warns(UserWarning):
        assert evaluator.compute()["bbox_mAP"] == 0.0


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_summary_is_kept_quiet_unless_verbose(ann_file, capsys, backend):
    evaluator = CocoEvaluator(ann_file, iou_types=("bbox",), backend=backend)
    evaluator.update(*_gt_detections(ann_file))
    capsys.readouterr()
    evaluator.compute()
    assert capsys.readouterr().out == ""
    assert "Average Precision" in evaluator.summary
    evaluator.verbose = True
    evaluator.compute()
    assert "Average Precision" in capsys.readouterr().out


def test_encode_masks_round_trips_through_pycocotools():
    masks = torch.rand(40, 13, 17, generator=torch.Generator().manual_seed(0)) > 0.5  # more than one chunk
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    decoded = mask_util.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1), masks.numpy())


def test_label_outside_the_category_table_names_the_image(ann_file):
    dets, metas = _gt_detections(ann_file, image_ids=(5,))
    dets[0].labels[0] = 3
    with pytest.raises(ValueError, match="image 5: labels \\[3\\]"):
        CocoEvaluator(ann_file).update(dets, metas)


def test_mask_size_must_be_the_original_image_size(ann_file):
    dets, metas = _gt_detections(ann_file, image_ids=(5,))
    metas[0]["orig_size"] = (100, 80)
    with pytest.raises(ValueError, match="image 5: masks are \\(120, 80\\)"):
        CocoEvaluator(ann_file).update(dets, metas)


def test_image_missing_from_the_annotation_file_is_an_error(ann_file):
    dets, metas = _gt_detections(ann_file, image_ids=(1,))
    metas[0]["image_id"] = 99
    with pytest.raises(ValueError, match="image ids \\[99\\]"):
        _run(ann_file, dets, metas)


def test_format_only_writes_results_without_annotations(ann_file, tmp_path):
    dets, metas = _gt_detections(ann_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(None, dets, metas, cat_ids=CAT_IDS, outfile_prefix=str(tmp_path / "test-dev")) == {}
    assert len(json.loads((tmp_path / "test-dev.segm.json").read_text())) == sum(len(d) for d in dets)


# mmdet 3.3.0 CocoMetric (metric=["bbox", "segm"], then "proposal"; it rounds to 3 decimals) on the detections
# below, with the categories of the annotation file listed in sorted order (mmdet maps labels in file order).
MMDET_COCO_METRIC = {
    "bbox_mAP": 0.036, "bbox_mAP_50": 0.111, "bbox_mAP_75": 0.028, "bbox_mAP_s": 0.038, "bbox_mAP_m": 0.311,
    "bbox_mAP_l": 0.0, "segm_mAP": 0.041, "segm_mAP_50": 0.056, "segm_mAP_75": 0.056, "segm_mAP_s": 0.057,
    "segm_mAP_m": 0.3, "segm_mAP_l": 0.0, "AR@100": 0.525, "AR@300": 0.525, "AR@1000": 0.525, "AR_s@1000": 0.167,
    "AR_m@1000": 0.7, "AR_l@1000": 0.9}


def test_matches_mmdet_coco_metric(ann_file):
    dets, metas = _perturbed_detections(ann_file, seed=5)
    image7 = Detections(torch.tensor([[5.0, 5.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.7, 0.2]),
                        torch.tensor([0, 1]), torch.zeros(2, 64, 64, dtype=torch.bool))
    image7.masks[0, 6:34, 5:35] = True
    dets, metas = dets + [image7], metas + [{"image_id": 7, "orig_size": (64, 64)}]
    metrics = _run(ann_file, dets, metas) | _run(ann_file, dets, metas, iou_types=("proposal",))
    assert {k: round(metrics[k], 3) for k in MMDET_COCO_METRIC} == pytest.approx(MMDET_COCO_METRIC, abs=1e-9)


def _ddp_worker(rank, init_file, ann_file, shards, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(shards))
    try:
        evaluator = CocoEvaluator(ann_file, backend="faster_coco_eval", outfile_prefix=f"{out_dir}/ddp")
        evaluator.update(*shards[rank])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(evaluator.compute()))
    finally:
        dist.destroy_process_group()


def test_ddp_gather_equals_single_process_and_drops_padding_repeats(ann_file, tmp_path):
    dets, metas = _perturbed_detections(ann_file, seed=3)
    single = _run(ann_file, dets, metas, backend="faster_coco_eval", outfile_prefix=str(tmp_path / "single"))
    # Two ranks as DistributedSampler deals 3 images: rank 1's shard is padded with a repeat of image 1.
    shards = [([dets[0], dets[2]], [metas[0], metas[2]]), ([dets[1], dets[0]], [metas[1], metas[0]])]
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), ann_file, shards, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single, f"rank {rank}"
    for iou_type in ("bbox", "segm"):
        gathered = json.loads((tmp_path / f"ddp.{iou_type}.json").read_text())
        assert gathered == json.loads((tmp_path / f"single.{iou_type}.json").read_text()), iou_type


def test_ddp_with_a_rank_that_saw_no_image_equals_single_process(ann_file, tmp_path):
    # the idle rank's states are empty lists: they must gather as empty int64/uint8 tensors, not float32 ones
    dets, metas = _perturbed_detections(ann_file, seed=5)
    single = _run(ann_file, dets, metas, backend="faster_coco_eval")
    shards = [(dets, metas), ([], [])]
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), ann_file, shards, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single, f"rank {rank}"


def test_only_rank_0_builds_the_results(ann_file, monkeypatch):
    from htc_lightning.evaluation import coco

    evaluator = CocoEvaluator(ann_file)
    evaluator.update(*_gt_detections(ann_file))
    monkeypatch.setattr(coco, "_dist_info", lambda: (1, 1))  # another rank (world 1: no broadcast to wait for)

    def refuse(*args):
        raise AssertionError("a rank other than 0 built COCO results")
    monkeypatch.setattr(evaluator, "_results", refuse)
    monkeypatch.setattr(evaluator, "per_image_results", refuse)
    assert evaluator.compute() is None
