"""CocoEvaluator against torchmetrics' MeanAveragePrecision(iou_type=("bbox", "segm")) on the same detections:
time of update (all batches) and compute, peak memory, and the metrics themselves.

Each metric runs in its own process (so peak RSS is its own): the synthetic split and detections of
``eval_speed.py`` are rebuilt from the seed, one image at a time (dense masks are never all in memory), fed
to the metric, and then ``compute()`` runs once. Memory: the process's peak RSS minus its RSS just before the
first update (the data generation's own peak is a few MB per image), and the metric's state size after the
updates (tensors' bytes for ours; pickled size of torchmetrics' states, which hold RLE tuples). Both use the
faster-coco-eval backend and COCO's float64 thresholds (torchmetrics' defaults are float32-rounded).

    python benchmarks/eval_vs_torchmetrics.py --num-images 1000
"""
from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_speed import make_detections, write_ground_truth  # noqa: E402

from htc_lightning.evaluation import CocoEvaluator  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _state_mb(metric) -> float:
    total = 0
    for name in metric._defaults:
        value = getattr(metric, name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            total += item.numel() * item.element_size() if torch.is_tensor(item) else len(pickle.dumps(item))
    return total / 2**20


def run_one(which: str, args: argparse.Namespace, ann_file: Path) -> dict:
    from torchmetrics.detection import MeanAveragePrecision

    torch.set_num_threads(1)
    height, width = args.image_size
    g = torch.Generator().manual_seed(args.seed)
    gts = write_ground_truth(ann_file, args.num_images, height, width, args.gt_per_image, args.num_classes, g)
    if which == "ours":
        metric = CocoEvaluator(str(ann_file), iou_types=("bbox", "segm"), backend="faster_coco_eval")
    else:
        metric = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="faster_coco_eval",
                                      iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
                                      rec_thresholds=np.linspace(0.0, 1.0, 101).tolist())
    coco = None
    if which != "ours":
        from pycocotools.coco import COCO
        coco = COCO(str(ann_file))
    base = _rss_mb()
    update_s = 0.0
    for image_id, (boxes, labels) in gts.items():
        det = make_detections(boxes, labels, args.dets_per_image, height, width, args.num_classes, g)
        if which == "ours":
            t0 = time.perf_counter()
            metric.update([det], [{"image_id": image_id, "orig_size": (height, width)}])
        else:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))  # the same polygons, as dense masks
            gt_masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool()
            area = torch.tensor([a["area"] for a in anns])
            t0 = time.perf_counter()
            metric.update([{"boxes": det.boxes, "scores": det.scores, "labels": det.labels + 1, "masks": det.masks}],
                          [{"boxes": boxes, "labels": labels + 1, "masks": gt_masks, "area": area}])
        update_s += time.perf_counter() - t0
    state_mb = _state_mb(metric)
    t0 = time.perf_counter()
    result = metric.compute()
    compute_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"update_s": update_s, "compute_s": compute_s, "peak_mb": peak - base, "state_mb": state_mb,
            "metrics": {k: float(v) for k, v in result.items() if k in (
                "bbox_mAP", "segm_mAP", "bbox_map", "segm_map", "bbox_mAP_50", "bbox_map_50")}}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Measures each metric in its own process, prints the table and returns {"ours"|"torchmetrics": row}, a row
    holding ``update_s``, ``compute_s``, ``peak_mb``, ``state_mb`` and ``metrics``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--gt-per-image", type=int, default=7)
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("ours", "torchmetrics"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_one(args.only, args, Path(tmp) / "gt.json")))
        return {}
    rows = {}
    for which in ("ours", "torchmetrics"):
        out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--only", which],
                             check=True, capture_output=True, text=True).stdout
        rows[which] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.num_images} images {args.image_size[0]}x{args.image_size[1]}, {args.dets_per_image} detections "
          f"with masks each, {args.gt_per_image} gt, {args.num_classes} classes; faster-coco-eval backend, 1 thread")
    print("| metric | update s | compute s | total s | peak RSS over start MB | state MB | box AP | mask AP |")
    print("|---|---|---|---|---|---|---|---|")
    for which, r in rows.items():
        m = r["metrics"]
        box, mask = m.get("bbox_mAP", m.get("bbox_map")), m.get("segm_mAP", m.get("segm_map"))
        print(f"| {which} | {r['update_s']:.1f} | {r['compute_s']:.1f} | {r['update_s'] + r['compute_s']:.1f} | "
              f"{r['peak_mb']:.0f} | {r['state_mb']:.1f} | {box:.4f} | {mask:.4f} |")
    return rows


if __name__ == "__main__":
    main()
