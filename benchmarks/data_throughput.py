"""Images per second that one DataLoader worker delivers through the training transforms.

COCO-size (640x480) synthetic JPEGs go through what a training worker does: decode, annotations to masks,
resize to (1333, 800) keeping the ratio, random flip, normalise (and, in the second row, the COCO-Stuff
map). One process with one thread stands for one worker. The table gives the median of ``--runs`` timed
passes after a warm-up pass.

    python benchmarks/data_throughput.py [--images 32] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from htc_lightning.data import CocoDetection, DetectionCollate, DetectionTransform, make_synthetic_coco


def images_per_second(dataset: CocoDetection, runs: int,
                      collate: DetectionCollate | None = None) -> tuple[list[float], list[float]]:
    """Per run: images per wall-clock second and images per CPU second of this process (the latter is
    what one worker delivers on a core of its own, even while other jobs share the machine)."""
    def one_pass() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(len(dataset)):
            sample = dataset[i]
            if collate is not None:
                collate([sample])
        return len(dataset) / (time.perf_counter() - wall), len(dataset) / (time.process_time() - cpu)

    one_pass()  # warm-up: first-call dispatch, page cache
    rates = [one_pass() for _ in range(runs)]
    return [w for w, _ in rates], [c for _, c in rates]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Measures, prints the table and returns it: {pipeline: {"wall", "cpu", "min", "max"}} in images/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_coco(tmp, args.images, 0, seed=0, image_size=(480, 640))
        transform = DetectionTransform([(1333, 800)], flip_prob=0.5)
        rows = []
        for name, stuff in (("instances", None), ("instances + stuff map", root / "stuffthingmaps" / "train2017")):
            dataset = CocoDetection(root / "annotations/instances_train2017.json", root / "train2017", transform,
                                    stuff_dir=stuff, train=True)
            for label, collate in (("", None), (" + pad", DetectionCollate(32))):
                wall, cpu = images_per_second(dataset, args.runs, collate)
                rows.append((name + label, statistics.median(wall), statistics.median(cpu), min(cpu), max(cpu)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU cores: {os.cpu_count()} (1 thread per worker), load average {load:.1f}; torch {torch.__version__}; "
          f"{args.images} images 640x480 -> 1333x800, median of {args.runs} runs after warm-up")
    print(f"| {'pipeline':<28} | {'images/s (wall)':>15} | {'images/CPU-s':>12} | {'min':>6} | {'max':>6} |")
    print(f"| {'-' * 28} | {'-' * 15} | {'-' * 12} | {'-' * 6} | {'-' * 6} |")
    for name, wall, cpu, lo, hi in rows:
        print(f"| {name:<28} | {wall:>15.1f} | {cpu:>12.1f} | {lo:>6.1f} | {hi:>6.1f} |")
    return {name: {"wall": wall, "cpu": cpu, "min": lo, "max": hi} for name, wall, cpu, lo, hi in rows}


if __name__ == "__main__":
    main()
