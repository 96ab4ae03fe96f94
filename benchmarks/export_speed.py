"""CPU inference time of the exported model (onnxruntime, and the torch.export program) vs our eager
``Detector.predict``, in one run, on the same image (s/image, median of ``--runs``).

Each side does the whole job of ``predict`` for one image: the exported graph plus ``export.finish`` (boxes to
the original frame, masks pasted), eager ``predict`` with its own post-processing. The image is a real photograph
(tests/fixtures/export_images) resized to exactly ``--height`` x ``--width``, normalised and padded to 32; the
weights are random (``pretrained`` false), seeded. On a shared machine the numbers are noisy: compare ratios
measured in one run.

    python benchmarks/export_speed.py                      # HTC R-50 at 800x1333 (exports ONNX first, minutes)
    python benchmarks/export_speed.py --config configs/tiny/htc_tiny_synthetic.yaml --height 128 --width 160 \
        --num-classes 4 --runs 1 --warmup 0
    python benchmarks/export_speed.py --exported DIR ...   # time files already written (DIR/model.onnx, .pt2)

``--exported`` skips the export (minutes for R-50): the files must hold this script's detector (same
``--config``, ``--num-classes``, seed 0); they are checked against eager inference on the image first.
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from htc_lightning import export
from htc_lightning.data.coco import load_rgb
from htc_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from htc_lightning.structures import ImageMeta
from htc_lightning.tools.mmdet_parity import build_detector

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "fixtures" / "export_images" / "000000521601.jpg"


def photo_input(height: int, width: int) -> tuple[torch.Tensor, ImageMeta]:
    image = load_rgb(PHOTO).float()[None]
    image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)[0]
    image = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    ph, pw = export.padded((height, width))
    batch = image.new_zeros(1, 3, ph, pw)
    batch[0, :, :height, :width] = image
    meta = ImageMeta(image_id=0, file_name=PHOTO.name, orig_size=(height, width), img_size=(height, width),
                     pad_size=(ph, pw), scale_factor=(1.0, 1.0), flip=False)
    return batch, meta


def seconds_per_image(fn, runs: int, warmup: int) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    times, count = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        count = len(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), count


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Exports, times, prints the table and returns it: {runtime: {"seconds" per image, "detections"}}."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "htc" / "htc_r50_fpn_1x_coco.yaml"))
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1333)
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--formats", nargs="+", default=["onnx", "torch.export"], choices=export.FORMATS)
    ap.add_argument("--out", default=None, help="folder for the exported files (default: a temporary one)")
    ap.add_argument("--exported", default=None, help="time the model.onnx / model.pt2 in this folder instead "
                                                      "of exporting (same --config, --num-classes, seed 0)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = [f"num_classes={args.num_classes}"]
    if "tiny" not in args.config:
        overrides.append("backbone.init_args.pretrained=false")
    detector = build_detector(args.config, overrides).eval()
    images, meta = photo_input(args.height, args.width)
    img_size = torch.tensor([[args.height, args.width]])
    out = None if args.exported else Path(args.out or tempfile.mkdtemp(prefix="export_speed_"))

    rows = []
    with torch.no_grad():
        rows.append(("eager (ours)", *seconds_per_image(lambda: detector.predict(images, [meta])[0], args.runs,
                                                         args.warmup)))
    for fmt in args.formats:
        if args.exported:
            path = Path(args.exported) / export.FILE_NAMES[fmt]
            runner = export.Runner(path, threads=args.threads)
            checked = export.check(detector, runner, [(images, meta)])[0]
            print(f"{path} vs eager: {checked}", flush=True)
            if not checked.ok:
                raise SystemExit(f"export_speed: {path} is not this detector ({args.config}, "
                                 f"{args.num_classes} classes, seed 0): {checked}")
        else:
            start = time.perf_counter()
            path = export.save(detector, fmt, out / fmt, (args.height, args.width))
            print(f"exported {fmt} to {path} in {time.perf_counter() - start:.0f} s", flush=True)
            runner = export.Runner(path, threads=args.threads)
        name = "onnxruntime CPU" if fmt == "onnx" else "torch.export program"
        rows.append((name, *seconds_per_image(lambda r=runner: export.finish(r(images, img_size), meta,
                                                                             detector.roi_head.mask_thr),
                                              args.runs, args.warmup)))

    eager = rows[0][1]
    print(f"\n{Path(args.config).name}, {args.height}x{args.width}, {args.threads} threads, random weights, "
          f"median of {args.runs} (shared CPU: noisy)")
    print("| runtime | s/image | vs eager | detections |")
    print("| --- | --- | --- | --- |")
    for name, seconds, count in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / eager:.2f}x | {count} |")
    return {name: {"seconds": seconds, "detections": count} for name, seconds, count in rows}


if __name__ == "__main__":
    main()
