"""COCO bbox + segm evaluation time: pycocotools vs faster-coco-eval through CocoEvaluator.

Builds a synthetic COCO split (``--num-images`` images of ``--image-size``, ``--gt-per-image`` objects with
polygon masks, ``--num-classes`` categories) and ``--dets-per-image`` detections per image (jittered ground
truth plus random false positives, with diamond masks), then times ``CocoEvaluator.compute()`` per iou type
and backend: ``--warmup`` untimed runs (they also load the ground truth, which is kept), then the median of
``--runs``. The timed part is loadRes + evaluate + accumulate + summarize; "segm" is the bbox+segm time minus
the bbox-only time. Also checks that both backends give the same numbers.

    python benchmarks/eval_speed.py --num-images 5000            # the full-size comparison
    python benchmarks/eval_speed.py --num-images 500 --runs 3    # a quick one
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pycocotools.mask as mask_util
import torch

from htc_lightning.evaluation import CocoEvaluator
from htc_lightning.structures import Detections

BACKENDS = ("pycocotools", "faster_coco_eval")


def random_boxes(n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """xyxy boxes of side 4..max(8, size/2) inside the image."""
    size = torch.tensor([width, height], dtype=torch.float32)
    wh = 4 + torch.rand(n, 2, generator=g) * (size / 2 - 4).clamp(min=4)
    xy = torch.rand(n, 2, generator=g) * (size - wh)
    return torch.cat([xy, xy + wh], dim=1)


def write_ground_truth(path: Path, num_images: int, height: int, width: int, per_image: int, num_classes: int,
                       g: torch.Generator) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """A COCO json with diamond-shaped polygons; returns image id -> (boxes xyxy, labels) for the detections."""
    images, anns, gts = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"{image_id:012d}.jpg"})
        boxes = random_boxes(per_image, height, width, g)
        labels = torch.randint(0, num_classes, (per_image,), generator=g)
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            polygon = [[cx, y1, x2, cy, cx, y2, x1, cy]]
            area = float(mask_util.area(mask_util.merge(mask_util.frPyObjects(polygon, height, width))))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "segmentation": polygon})
        gts[image_id] = (boxes, labels)
    categories = [{"id": c + 1, "name": f"class{c + 1}"} for c in range(num_classes)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return gts


def make_detections(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, num: int, height: int, width: int,
                    num_classes: int, g: torch.Generator) -> Detections:
    jitter = torch.randn(gt_boxes.shape, generator=g) * 2
    fp = num - len(gt_boxes)
    boxes = torch.cat([gt_boxes + jitter, random_boxes(fp, height, width, g)])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    labels = torch.cat([gt_labels, torch.randint(0, num_classes, (fp,), generator=g)])
    scores = torch.cat([0.5 + 0.5 * torch.rand(len(gt_boxes), generator=g), 0.6 * torch.rand(fp, generator=g)])
    ys = torch.arange(height, dtype=torch.float32)[None, :, None]
    xs = torch.arange(width, dtype=torch.float32)[None, None, :]
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, ((boxes[:, 2:] - boxes[:, :2]) / 2).clamp(min=0.5)
    # Diamonds inscribed in the boxes, like the ground-truth polygons.
    masks = ((xs - centre[:, 0, None, None]).abs() / half[:, 0, None, None]
             + (ys - centre[:, 1, None, None]).abs() / half[:, 1, None, None]) <= 1
    return Detections(boxes, scores, labels, masks)


def main(argv: list[str] | None = None) -> dict:
    """Measures, prints the table and returns ``times`` {(iou type, backend): (wall s, CPU s)}, each backend's
    ``metrics`` and their largest difference ``max_diff``; exits non-zero when the backends disagree."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--gt-per-image", type=int, default=7)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    height, width = args.image_size
    g = torch.Generator().manual_seed(args.seed)
    torch.set_num_threads(1)  # the synthetic data is many tiny tensor ops: threads only add overhead

    with tempfile.TemporaryDirectory() as tmp:
        ann_file = Path(tmp) / "gt.json"
        t0 = time.perf_counter()
        gts = write_ground_truth(ann_file, args.num_images, height, width, args.gt_per_image, args.num_classes, g)
        # bbox-only and bbox+segm evaluators per backend; segm time = the difference.
        evaluators = {(iou, backend): CocoEvaluator(str(ann_file), iou_types=iou_types, backend=backend)
                      for iou, iou_types in (("bbox", ("bbox",)), ("both", ("bbox", "segm")))
                      for backend in BACKENDS}
        update_s = 0.0
        for image_id, (boxes, labels) in gts.items():
            # Built and encoded one image at a time: 5,000 x 100 dense masks would not fit in memory.
            det = make_detections(boxes, labels, args.dets_per_image, height, width, args.num_classes, g)
            meta = {"image_id": image_id, "orig_size": (height, width)}
            for (iou, backend), evaluator in evaluators.items():
                t1 = time.perf_counter()
                evaluator.update([det], [meta])
                if (iou, backend) == ("both", "pycocotools"):
                    update_s += time.perf_counter() - t1
        print(f"{args.num_images} images {height}x{width}, {args.gt_per_image} gt and {args.dets_per_image} "
              f"detections each, {args.num_classes} classes (data built in {time.perf_counter() - t0:.1f} s)")

        # Wall time, and CPU time of all threads (faster-coco-eval computes mask IoUs in a thread pool): on a
        # shared machine the CPU time is the steadier figure.
        times: dict[tuple[str, str], tuple[float, float]] = {}
        metrics: dict[str, dict[str, float]] = {}
        for (iou, backend), evaluator in evaluators.items():
            for _ in range(args.warmup):
                evaluator.compute()
            wall, cpu = [], []
            for _ in range(args.runs):
                t0, c0 = time.perf_counter(), time.process_time()
                result = evaluator.compute()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            times[iou, backend] = statistics.median(wall), statistics.median(cpu)
            if iou == "both":
                metrics[backend] = result
        for backend in BACKENDS:
            times["segm", backend] = tuple(b - a for a, b in zip(times["bbox", backend], times["both", backend]))

    print(f"update() with RLE encoding of all masks (one evaluator): {update_s:.1f} s\n")
    print(f"median of {args.runs} runs after {args.warmup} warm-up, seconds (wall / CPU)")
    print(f"| {'iou type':8} | {'pycocotools':>15} | {'faster-coco-eval':>16} | {'speed-up wall/CPU':>17} |")
    print(f"|{'-' * 10}|{'-' * 17}|{'-' * 18}|{'-' * 19}|")
    for iou_type in ("bbox", "segm", "both"):
        (slow, slow_cpu), (fast, fast_cpu) = times[iou_type, "pycocotools"], times[iou_type, "faster_coco_eval"]
        print(f"| {iou_type:8} | {slow:7.2f} / {slow_cpu:5.2f} | {fast:7.2f} / {fast_cpu:6.2f} | "
              f"{slow / fast:7.1f}x / {slow_cpu / fast_cpu:5.1f}x |")
    diff = max(abs(metrics["pycocotools"][k] - metrics["faster_coco_eval"][k]) for k in metrics["pycocotools"])
    print(f"\nbbox_mAP {metrics['pycocotools']['bbox_mAP']:.4f}, segm_mAP {metrics['pycocotools']['segm_mAP']:.4f}; "
          f"max |pycocotools - faster-coco-eval| over all 24 metrics: {diff:.2e}")
    if diff > 1e-12:
        raise SystemExit("backends disagree")
    return {"times": times, "metrics": metrics, "max_diff": diff}


if __name__ == "__main__":
    main()
