"""Error analysis of COCO results: confusion matrix, per-category precision-recall curves and AP, worst images.

    python -m htc_lightning.tools.analyze_results --ann data/coco/annotations/instances_val2017.json \\
        outputs/run/results.test.bbox.json outputs/run/results.test.segm.json \\
        --images data/coco/val2017 --out outputs/analysis

writes into ``--out``:

- ``confusion_matrix.png`` / ``.csv``: rows the ground-truth category (and "background": detections that
  overlap no object), columns the predicted one (and "missed"); counts over detections scoring at least
  ``--score-thr`` matched at IoU >= ``--iou-thr`` (mmdetection's ``confusion_matrix.py`` rule: a detection
  counts once per object it overlaps; an object no detection of its class found counts as missed). The picture
  shows each row as percentages, for the categories present in the ground truth or the detections.
- ``pr_<bbox|segm>.png`` / ``ap_<bbox|segm>.csv``: COCOeval's precision over recall per category, at IoU 0.5,
  0.75 and averaged over 0.5:0.95 (area all, 100 detections), with each category's AP.
- ``worst/NN_<image>.png`` and ``worst_images.csv``: the images with the most errors (missed objects + detections
  matching no object of their class) drawn: ground truth green (missed: yellow), detections blue (wrong: red).

The results files are what ``test`` writes (``results.test.bbox.json``; category ids of the annotation file).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from .charts import heatmap, line_chart_grid

GREEN, YELLOW, BLUE, RED = (40, 200, 40), (255, 210, 0), (40, 120, 255), (230, 30, 30)


def _xyxy(boxes: list[list[float]]) -> torch.Tensor:
    b = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def match_image(gts: list[dict], dets: list[dict], iou_thr: float) -> tuple[list[tuple[int, int]], list[bool],
                                                                            list[bool]]:
    """mmdetection's confusion-matrix matching for one image (crowd objects left out beforehand).

    Returns the (ground-truth category, predicted category) pairs, with -1 for "background" (a detection
    overlapping no object) and for "missed" (an object no detection of its class found), whether each object was
    found, and whether each detection matched an object of its own class."""
    ious = box_iou(_xyxy([g["bbox"] for g in gts]), _xyxy([d["bbox"] for d in dets]))
    pairs: list[tuple[int, int]] = []
    found = [False] * len(gts)
    correct = [False] * len(dets)
    for j, det in enumerate(dets):
        overlapping = (ious[:, j] >= iou_thr).nonzero().flatten().tolist() if len(gts) else []
        for i in overlapping:
            pairs.append((gts[i]["category_id"], det["category_id"]))
            if gts[i]["category_id"] == det["category_id"]:
                found[i] = True
                correct[j] = True
        if not overlapping:
            pairs.append((-1, det["category_id"]))
    pairs += [(g["category_id"], -1) for g, ok in zip(gts, found) if not ok]
    return pairs, found, correct


def analyse_matches(gt: COCO, results: list[dict], score_thr: float = 0.3, iou_thr: float = 0.5
                    ) -> tuple[np.ndarray, list[int], list[dict]]:
    """The confusion matrix ((C + 1) x (C + 1), last row/column background/missed) over ``gt.getCatIds()`` and,
    per image, its found/missed objects and right/wrong detections."""
    cat_ids = sorted(gt.getCatIds())
    index = {c: i for i, c in enumerate(cat_ids)} | {-1: len(cat_ids)}
    matrix = np.zeros((len(cat_ids) + 1, len(cat_ids) + 1), dtype=np.int64)
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= score_thr:
            by_image.setdefault(int(r["image_id"]), []).append(r)
    images = []
    for image_id in sorted(gt.getImgIds()):
        gts = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        dets = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        pairs, found, correct = match_image(gts, dets, iou_thr)
        for g, p in pairs:
            matrix[index[g], index[p]] += 1
        images.append({"image_id": image_id, "gts": gts, "dets": dets, "found": found, "correct": correct,
                       "missed": found.count(False), "wrong": correct.count(False)})
    return matrix, cat_ids, images


def pr_curves(gt: COCO, results: list[dict], iou_type: str) -> tuple[np.ndarray, dict[int, dict]]:
    """COCOeval's 101 recall points and, per category id, precision curves (-1 where undefined) and AP."""
    if not results:  # pycocotools cannot load an empty result list: nothing found, precision 0 where there is gt
        recall = np.linspace(0, 1, 101)
        with_gt = {a["category_id"] for a in gt.loadAnns(gt.getAnnIds(iscrowd=False))}
        return recall, {c: {"IoU .5": np.zeros(101), "IoU .75": np.zeros(101), "IoU .5:.95": np.zeros(101),
                            "AP": 0.0 if c in with_gt else -1.0} for c in gt.getCatIds()}
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iou_type)
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (iou thresholds, recall points, categories)
    ious = list(np.round(ev.params.iouThrs, 2))
    curves = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        mean = np.where((p > -1).all(0), np.where(p > -1, p, 0).mean(0), -1.0)
        defined = p[p > -1]
        curves[cat_id] = {"IoU .5": p[ious.index(0.5)], "IoU .75": p[ious.index(0.75)], "IoU .5:.95": mean,
                          "AP": float(defined.mean()) if defined.size else -1.0}
    return np.asarray(ev.params.recThrs), curves


def draw_errors(picture: Image.Image, image: dict, names: dict[int, str]) -> Image.Image:
    out = picture.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()

    def box(b, color, text, width):
        x, y, w, h = b
        draw.rectangle([x, y, x + w, y + h], outline=color, width=width)
        left, top, right, bottom = draw.textbbox((x + 2, y + 1), text, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
        draw.text((x + 2, y + 1), text, fill=(0, 0, 0), font=font)

    for g, ok in zip(image["gts"], image["found"]):
        box(g["bbox"], GREEN if ok else YELLOW, f"gt {names[g['category_id']]}" + ("" if ok else " MISSED"), 2)
    for d, ok in zip(image["dets"], image["correct"]):
        box(d["bbox"], BLUE if ok else RED, f"{names[d['category_id']]} {d['score']:.2f}", 2 if ok else 3)
    return out


def analyze(ann_file: str, result_files: list[str], out: str, images_dir: str | None = None,
            score_thr: float = 0.3, iou_thr: float = 0.5, worst: int = 10) -> list[Path]:
    """Writes the files listed in the module docstring; returns their paths."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    loaded = {}
    for path in result_files:
        results = json.loads(Path(path).read_text())
        if not isinstance(results, list):
            raise ValueError(f"{path}: expected a list of COCO results, got a {type(results).__name__}")
        unknown = sorted({r["category_id"] for r in results} - set(names))
        if unknown:
            raise ValueError(f"{path}: category ids {unknown[:10]} are not in {ann_file}: was it written for "
                             "another annotation file?")
        segm = "segmentation" in results[0] if results else ".segm." in Path(path).name
        loaded["segm" if segm else "bbox"] = results
    if "bbox" not in loaded and "segm" in loaded:
        # segm results carry no box: the confusion matrix matches their masks' boxes
        from pycocotools import mask as mask_util
        loaded_boxes = [dict(r, bbox=list(mask_util.toBbox(r["segmentation"]))) for r in loaded["segm"]]
    else:
        loaded_boxes = loaded["bbox"]

    matrix, cat_ids, images = analyse_matches(gt, loaded_boxes, score_thr, iou_thr)
    labels = [names[c] for c in cat_ids] + ["background"]
    with open(out_dir / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ground truth \\ predicted"] + labels[:-1] + ["missed"])
        writer.writerows([label, *row] for label, row in zip(labels, matrix.tolist()))
    shown = [i for i in range(len(labels)) if matrix[i].sum() or matrix[:, i].sum()]
    sub = matrix[np.ix_(shown, shown)].astype(np.float64)
    percent = 100 * sub / np.maximum(sub.sum(1, keepdims=True), 1)
    col_labels = [labels[i] if i < len(cat_ids) else "missed" for i in shown]
    heatmap(percent, [labels[i] for i in shown], col_labels,
            f"confusion matrix (% of each row; score >= {score_thr}, IoU >= {iou_thr})", "ground truth",
            "predicted").save(out_dir / "confusion_matrix.png")
    written += [out_dir / "confusion_matrix.csv", out_dir / "confusion_matrix.png"]

    present = sorted({a["category_id"] for a in gt.loadAnns(gt.getAnnIds(iscrowd=False))})
    for iou_type, results in loaded.items():
        recall, curves = pr_curves(gt, results, iou_type)
        with open(out_dir / f"ap_{iou_type}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["category_id", "name", "AP"])
            writer.writerows([c, names[c], f"{curves[c]['AP']:.4f}"] for c in sorted(curves))
        charts = [(f"{names[c][:18]} AP {curves[c]['AP']:.2f}",
                   {k: v for k, v in curves[c].items() if k != "AP"}) for c in present]
        line_chart_grid(charts, recall, f"{iou_type}: precision-recall per category", "recall",
                        "precision").save(out_dir / f"pr_{iou_type}.png")
        written += [out_dir / f"ap_{iou_type}.csv", out_dir / f"pr_{iou_type}.png"]

    ranked = sorted(images, key=lambda im: (-(im["missed"] + im["wrong"]), im["image_id"]))[:worst]
    with open(out_dir / "worst_images.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "image_id", "file_name", "missed", "wrong_detections", "objects"])
        for rank, im in enumerate(ranked):
            info = gt.loadImgs(im["image_id"])[0]
            writer.writerow([rank, im["image_id"], info["file_name"], im["missed"], im["wrong"], len(im["gts"])])
            if images_dir is not None:
                path = Path(images_dir) / info["file_name"]
                if not path.is_file():
                    raise FileNotFoundError(f"image {path} (image {im['image_id']} of {ann_file}) does not exist: "
                                            "is --images the folder of this annotation file's images?")
                target = out_dir / "worst" / f"{rank:02d}_{Path(info['file_name']).stem}.png"
                target.parent.mkdir(exist_ok=True)
                with Image.open(path) as picture:
                    draw_errors(picture, im, names).save(target)
                written.append(target)
    written.append(out_dir / "worst_images.csv")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="COCO results json files (bbox and/or segm)")
    parser.add_argument("--ann", required=True, help="the COCO annotation file the results are for")
    parser.add_argument("--images", default=None, help="its image folder, to draw the worst images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--score-thr", type=float, default=0.3)
    parser.add_argument("--iou-thr", type=float, default=0.5)
    parser.add_argument("--worst", type=int, default=10, help="how many of the worst images to draw")
    args = parser.parse_args(argv)
    for path in analyze(args.ann, args.results, args.out, args.images, args.score_thr, args.iou_thr, args.worst):
        print(path)


if __name__ == "__main__":
    main()
