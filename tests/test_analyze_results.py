"""``python -m htc_lightning.tools.analyze_results``: mmdetection's confusion-matrix matching, per-category
precision-recall curves and AP, and the worst images drawn, on the real photographs of coco_tiny_28."""
from __future__ import annotations

import csv
import json

import pytest
from _real28 import COCO_TINY_28
from PIL import Image

from htc_lightning.tools.analyze_results import main, match_image

ANN = COCO_TINY_28 / "annotations" / "instances_val2017.json"


def _obj(cat: int, x: float, y: float, w: float = 10, h: float = 10, score: float | None = None) -> dict:
    return {"category_id": cat, "bbox": [x, y, w, h]} | ({} if score is None else {"score": score})


def test_matching_counts_right_confused_background_and_missed():
    gts = [_obj(1, 0, 0), _obj(2, 50, 50), _obj(3, 100, 100)]
    dets = [_obj(1, 1, 0, score=0.9),       # right
            _obj(5, 50, 51, score=0.8),     # overlaps the category-2 object: confused
            _obj(4, 200, 200, score=0.7)]   # overlaps nothing: background
    pairs, found, correct = match_image(gts, dets, iou_thr=0.5)
    assert sorted(pairs) == sorted([(1, 1), (2, 5), (-1, 4), (2, -1), (3, -1)])
    assert found == [True, False, False] and correct == [True, False, False]


def _results_from_ground_truth(drop: set[int]) -> list[dict]:
    data = json.loads(ANN.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in data["annotations"] if not a["iscrowd"] and a["id"] not in drop]


def _rows(path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))


def test_perfect_results_give_a_diagonal_matrix_ap_one_and_no_error(tmp_path):
    results = tmp_path / "results.bbox.json"
    results.write_text(json.dumps(_results_from_ground_truth(drop=set())))
    main([str(results), "--ann", str(ANN), "--images", str(COCO_TINY_28 / "val2017"), "--out", str(tmp_path / "a")])
    rows = _rows(tmp_path / "a" / "confusion_matrix.csv")
    header, body = rows[0], rows[1:]
    counts = {(r[0], header[j]): int(v) for r in body for j, v in enumerate(r[1:], 1) if int(v)}
    data = json.loads(ANN.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    expected: dict[tuple[str, str], int] = {}
    for a in data["annotations"]:
        key = (names[a["category_id"]], names[a["category_id"]])
        expected[key] = expected.get(key, 0) + 1
    assert counts == expected
    ap = {r[1]: float(r[2]) for r in _rows(tmp_path / "a" / "ap_bbox.csv")[1:]}
    assert all(ap[names[a["category_id"]]] == pytest.approx(1.0) for a in data["annotations"])
    assert ap["toothbrush"] == -1.0  # no ground truth
    worst = _rows(tmp_path / "a" / "worst_images.csv")[1:]
    assert len(worst) == 4 and all(r[3] == "0" and r[4] == "0" for r in worst)
    for name in ("confusion_matrix.png", "pr_bbox.png"):
        assert Image.open(tmp_path / "a" / name).size[0] > 100


def test_a_missed_object_is_counted_and_its_image_drawn_first(tmp_path):
    data = json.loads(ANN.read_text())
    person = next(a for a in data["annotations"] if a["category_id"] == 1)
    results = tmp_path / "results.bbox.json"
    results.write_text(json.dumps(_results_from_ground_truth(drop={person["id"]})))
    main([str(results), "--ann", str(ANN), "--images", str(COCO_TINY_28 / "val2017"), "--out", str(tmp_path / "a"),
          "--worst", "2"])
    rows = _rows(tmp_path / "a" / "confusion_matrix.csv")
    person_row = next(r for r in rows if r[0] == "person")
    assert person_row[-1] == "1"  # the "missed" column
    worst = _rows(tmp_path / "a" / "worst_images.csv")[1:]
    assert int(worst[0][1]) == person["image_id"] and worst[0][3] == "1"
    drawn = sorted((tmp_path / "a" / "worst").glob("*.png"))
    info = next(i for i in data["images"] if i["id"] == person["image_id"])
    assert len(drawn) == 2 and drawn[0].name.startswith("00_") and Image.open(drawn[0]).size == (info["width"],
                                                                                                  info["height"])


def test_results_for_another_annotation_file_are_an_error_naming_the_ids(tmp_path):
    results = tmp_path / "results.bbox.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 999, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    with pytest.raises(ValueError, match=r"category ids \[999\] are not in"):
        main([str(results), "--ann", str(ANN), "--out", str(tmp_path / "a")])


def test_a_real_test_run_is_analysed_from_the_files_it_wrote(tmp_path):
    from _real28 import real_htc_config

    from htc_lightning.cli import HTCLightningCLI

    config = real_htc_config(tmp_path, max_steps=1, limit_val_batches=0)
    HTCLightningCLI(args=["fit", "--config", config])
    HTCLightningCLI(args=["test", "--config", config, "--ckpt_path", str(tmp_path / "run/checkpoints/last.ckpt"),
                          "--model.init_args.outfile_prefix", str(tmp_path / "results")])
    files = [str(tmp_path / "results.test.bbox.json"), str(tmp_path / "results.test.segm.json")]
    main([*files, "--ann", str(ANN), "--images", str(COCO_TINY_28 / "val2017"), "--out", str(tmp_path / "a"),
          "--score-thr", "0.0"])
    for name in ("confusion_matrix.png", "pr_bbox.png", "pr_segm.png", "ap_segm.csv", "worst_images.csv"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    matrix = _rows(tmp_path / "a" / "confusion_matrix.csv")
    objects = sum(int(v) for r in matrix[1:-1] for v in r[1:])  # every object is found or missed at least once
    assert objects >= len(json.loads(ANN.read_text())["annotations"])
