"""Peak memory of one training sample from a huge photograph (decode, masks, resize to the training scale).

A phone or drone photo of 12000x9000 with a few objects goes through ``CocoDetection`` and the training
transform in a fresh process; the table gives that process's peak resident memory above its state just
before the sample (imports, dataset built), for a few object counts, beside a COCO-size 640x480 image.

    python benchmarks/data_huge_image_memory.py [--size 12000 9000] [--objects 3 30]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(root: Path, width: int, height: int, objects: int) -> Path:
    """One JPEG (a smooth gradient, so it compresses) and ``objects`` polygons spread over it."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    row = np.stack([ramp, ramp[::-1], np.full_like(ramp, 128)], axis=1).astype(np.uint8)
    Image.fromarray(np.broadcast_to(row, (height, width, 3))).save(root / "train2017" / "huge.jpg", quality=80)
    anns = []
    for k in range(objects):
        x0, y0 = (k * 0.8 / objects) * width, (k * 0.8 / objects) * height
        w, h = 0.2 * width, 0.2 * height
        poly = [x0, y0, x0 + w, y0 + 0.3 * h, x0 + 0.7 * w, y0 + h, x0, y0 + 0.6 * h]
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x0, y0, w, h], "area": w * h * 0.5,
                     "iscrowd": 0, "segmentation": [poly]})
    data = {"images": [{"id": 1, "file_name": "huge.jpg", "width": width, "height": height}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}
    ann = root / "annotations" / "instances_train2017.json"
    ann.write_text(json.dumps(data))
    return ann


_CHILD = """
import resource, sys
from htc_lightning.data import CocoDetection, DetectionTransform
ds = CocoDetection(sys.argv[1], sys.argv[2], DetectionTransform([(1333, 800)], flip_prob=0.5), train=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image, target = ds[(0, 0)]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, tuple(image.shape), tuple(target["masks"].shape))
"""


def peak_mib(ann: Path, images: Path) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ann), str(images)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    before, after = int(out[0]), int(out[1])  # KiB on Linux
    return (after - before) / 1024, " ".join(out[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(12000, 9000), metavar=("W", "H"))
    parser.add_argument("--objects", type=int, nargs="+", default=[3, 30])
    args = parser.parse_args()
    cases = [(640, 480, n) for n in args.objects] + [(*args.size, n) for n in args.objects]
    print(f"peak resident memory of one training sample above the built dataset (fresh process each); "
          f"CPU cores {os.cpu_count()}, max RSS by getrusage ({resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}"
          f" KiB in this parent)")
    print(f"| {'image':>11} | {'objects':>7} | {'peak MiB':>8} | {'output (image, masks)':<34} |")
    print(f"| {'-' * 11} | {'-' * 7} | {'-' * 8} | {'-' * 34} |")
    for width, height, objects in cases:
        with tempfile.TemporaryDirectory() as tmp:
            ann = make_dataset(Path(tmp), width, height, objects)
            mib, shapes = peak_mib(ann, Path(tmp) / "train2017")
        print(f"| {f'{width}x{height}':>11} | {objects:>7} | {mib:>8.0f} | {shapes:<34} |")


if __name__ == "__main__":
    main()
