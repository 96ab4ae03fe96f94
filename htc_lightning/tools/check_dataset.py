"""Checks a COCO-format dataset before training: the annotation file (ids, coordinates, categories) and every image
file it lists (missing, empty, truncated, undecodable, unsupported mode, size or EXIF orientation not matching the
json), and prints one report. Exit status 1 when anything is wrong.

    python -m htc_lightning.tools.check_dataset --data_root data/coco            # train2017 and val2017
    python -m htc_lightning.tools.check_dataset --ann my/train.json --images my/train [--ann ... --images ...]
    python -m htc_lightning.tools.check_dataset --data_root data/coco --decode   # also decode every file fully

Training runs the same image check with ``--data.init_args.check_images true``.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from htc_lightning.data.coco import CocoDetection
from htc_lightning.data.images import problem_report


def check_split(ann: Path, images: Path, threads: int, decode: bool) -> tuple[int, list[str]]:
    """(images checked, report lines) for one annotation file and its image folder."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = CocoDetection(ann, images, missing_images="skip")
        except (ValueError, FileNotFoundError) as e:
            return 0, [f"{ann}: {e}"]
    lines = [f"{ann}: {w.message}" for w in caught]  # dropped annotations, missing files
    problems = dataset.check_images(num_threads=threads, decode=decode)
    if problems:
        lines.append(problem_report(problems, ann, len(dataset)))
    return len(dataset), lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", type=Path, help="a COCO-layout folder: checks annotations/instances_"
                                                       "{split}.json with {split}/ for each --split")
    parser.add_argument("--split", action="append", help="with --data_root (default: train2017 and val2017)")
    parser.add_argument("--ann", type=Path, action="append", default=[], help="an annotation json (repeatable)")
    parser.add_argument("--images", type=Path, action="append", default=[], help="its image folder, one per --ann")
    parser.add_argument("--decode", action="store_true", help="decode every image fully (slower; finds corrupt "
                                                              "data inside files too)")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    if len(args.ann) != len(args.images):
        parser.error("give one --images folder per --ann file")
    splits = list(zip(args.ann, args.images))
    if args.data_root is not None:
        for split in args.split or ["train2017", "val2017"]:
            ann = args.data_root / "annotations" / f"instances_{split}.json"
            if ann.is_file() or args.split:
                splits.append((ann, args.data_root / split))
    if not splits:
        parser.error("nothing to check: give --data_root or --ann/--images")

    bad = False
    for ann, images in splits:
        start = time.perf_counter()
        if not ann.is_file():
            print(f"{ann}: no such annotation file")
            bad = True
            continue
        count, lines = check_split(ann, images, args.threads, args.decode)
        bad |= bool(lines)
        status = "problems found" if lines else "ok"
        print(f"{ann} ({images}): {count} images checked in {time.perf_counter() - start:.1f} s, {status}")
        for line in lines:
            print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
