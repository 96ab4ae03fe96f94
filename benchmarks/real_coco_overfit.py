"""The tiny semantic-free HTC learns real photographs: it overfits N real COCO train images (CPU, from scratch).

    python benchmarks/real_coco_overfit.py --coco ../shared/coco_tiny                 # 16 images, defaults below
    python benchmarks/real_coco_overfit.py --coco DIR --images 16 --size 320 --steps 1500 --lr 0.02 --threads 2

A sanity check on real data (real polygons, crowd regions, COCO's non-contiguous category ids, JPEG decoding),
not a benchmark of accuracy: the detector of ``configs/tiny/htc-without-semantic_tiny_coco.yaml`` (ResNet-18 at
1/4 width, random init, 80 classes from the annotation file) trains on the first N training images of ``--coco``
that have a non-crowd annotation, and is evaluated on the *same* images (their own COCO json, written to a
temporary folder) with ``CocoEvaluator``. A model that cannot overfit a handful of images has a bug; one that
does shows the whole path (data -> losses -> detections -> COCO json) is right on real photographs.

Training: SGD (momentum 0.9, weight decay 1e-4), linear warm-up, x0.1 at 3/4 of the steps, gradient clipping
(max norm 20), batch 4, the data module's loader (shuffled each epoch, random flip with ``--flip``). Prints the
mean loss every ``--log-every`` steps and a table of box / mask AP at every ``--eval-every`` steps.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from htc_lightning.data.coco import load_json
from htc_lightning.data.datamodule import CocoDataModule
from htc_lightning.evaluation.coco import CocoEvaluator
from htc_lightning.tools.mmdet_parity import build_detector

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "htc-without-semantic_tiny_coco.yaml"


def subset_root(coco: Path, ann: str, images: str, n: int, out: Path) -> Path:
    """A COCO folder at ``out`` whose train json holds the first ``n`` images with a non-crowd annotation."""
    data = load_json(coco / ann)
    usable = sorted({a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)})[:n]
    if len(usable) < n:
        raise SystemExit(f"{coco / ann} has only {len(usable)} images with a non-crowd annotation (asked {n})")
    keep = set(usable)
    subset = {**data, "images": [i for i in data["images"] if i["id"] in keep],
              "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    (out / "annotations").mkdir(parents=True)
    (out / "annotations" / "train.json").write_text(json.dumps(subset))
    (out / "images").symlink_to((coco / images).resolve(), target_is_directory=True)
    return out


def evaluate(detector, dm: CocoDataModule) -> dict[str, float]:
    detector.eval()
    evaluator = CocoEvaluator(dm.val_ann_file, dm.cat_ids, backend="faster_coco_eval")
    with torch.no_grad():
        for images, targets in dm.val_dataloader():
            metas = [t["meta"] for t in targets]
            evaluator.update(detector.predict(images, metas), metas)
    detector.train()
    return evaluator.compute()


def main(argv: list[str] | None = None) -> dict:
    """Trains, prints the loss curve and the AP table, and returns ``images``, ``annotations``, ``classes``, the
    ``curve`` [(step, mean total loss since the last log)] and ``evals`` [(step, s, box AP, AP50, mask AP,
    AP50)]; a non-finite loss ends the run with an error."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "coco_tiny")
    parser.add_argument("--ann", default="annotations/instances_train2017.json")
    parser.add_argument("--image-dir", default="train2017")
    parser.add_argument("--images", type=int, default=16, help="number of training images (N)")
    parser.add_argument("--size", type=int, default=320, help="long-edge limit of the images")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--flip", type=float, default=0.0, help="random horizontal flip probability")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (on a shared machine more threads spin and slow the run down)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[],
                        help="detector override as in mmdet_parity, e.g. roi_head.init_args.score_thr=0.01")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = subset_root(args.coco, args.ann, args.image_dir, args.images, Path(tmp) / "coco")
        scale = (args.size, args.size)
        dm = CocoDataModule(str(root), train_ann="annotations/train.json", train_images="images",
                            val_ann="annotations/train.json", val_images="images", train_scales=[scale],
                            test_scale=scale, flip_prob=args.flip, batch_size=args.batch_size,
                            val_batch_size=args.batch_size, num_workers=0, seed=args.seed)
        dm.setup("fit")
        torch.manual_seed(args.seed)
        detector = build_detector(str(CONFIG), [f"num_classes={dm.num_classes}",
                                                *args.override])
        n_gt = sum(len(a) for _, a in dm.train_dataset.records)
        print(f"{len(dm.train_dataset)} images ({n_gt} annotations) from {args.coco / args.ann}, {dm.num_classes} "
              f"classes, {args.size} px, batch {args.batch_size}, lr {args.lr}, {args.steps} steps, flip {args.flip}",
              flush=True)

        params = [p for p in detector.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
        loader = dm.train_dataloader()
        decay_at = int(0.75 * args.steps)
        rows: list[tuple[int, float, float, float, float, float]] = []
        curve: list[tuple[int, float]] = []
        window: dict[str, list[float]] = {}
        start = time.perf_counter()
        step, epoch = 0, 0
        detector.train()
        while step < args.steps:
            dm.train_sampler.set_epoch(epoch)
            for images, targets in loader:
                factor = min(1.0, 0.001 + 0.999 * step / args.warmup) * (0.1 if step >= decay_at else 1.0)
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * factor
                losses = detector.loss(images, targets)
                total = torch.stack([v.sum() for v in losses.values()]).sum()
                if not math.isfinite(float(total.detach())):
                    raise SystemExit(f"step {step}: non-finite loss {({k: float(v) for k, v in losses.items()})}")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, 20.0)
                optimizer.step()
                for name, value in [("total", total), *losses.items()]:
                    window.setdefault(name, []).append(float(value.detach().sum()))
                step += 1
                if step % args.log_every == 0:
                    mean = {k: sum(v) / len(v) for k, v in window.items()}
                    curve.append((step, mean["total"]))
                    print(f"step {step:5d}  {time.perf_counter() - start:7.0f} s  loss {mean['total']:.3f}  "
                          f"rpn {mean.get('loss_rpn_cls', 0) + mean.get('loss_rpn_bbox', 0):.3f}  "
                          f"s0 cls {mean.get('s0.loss_cls', 0):.3f}  s0 mask {mean.get('s0.loss_mask', 0):.3f}  "
                          f"lr {args.lr * factor:.4f}", flush=True)
                    window = {}
                if step % args.eval_every == 0 or step == args.steps:
                    metrics = evaluate(detector, dm)
                    rows.append((step, time.perf_counter() - start, metrics["bbox_mAP"], metrics["bbox_mAP_50"],
                                 metrics["segm_mAP"], metrics["segm_mAP_50"]))
                    print(f"eval at step {step}: box AP {metrics['bbox_mAP']:.3f} (AP50 {metrics['bbox_mAP_50']:.3f})"
                          f"  mask AP {metrics['segm_mAP']:.3f} (AP50 {metrics['segm_mAP_50']:.3f})", flush=True)
                if step >= args.steps:
                    break
            epoch += 1

    print(f"\nAP on the {args.images} training images themselves ({args.size} px, from scratch):")
    print("| step | time (s) | box AP | box AP50 | mask AP | mask AP50 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for s, t, b, b50, m, m50 in rows:
        print(f"| {s} | {t:.0f} | {b:.3f} | {b50:.3f} | {m:.3f} | {m50:.3f} |")
    return {"images": len(dm.train_dataset), "annotations": n_gt, "classes": dm.num_classes, "curve": curve,
            "evals": rows}


if __name__ == "__main__":
    main()
