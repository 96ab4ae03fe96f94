"""Where HTC's time goes: ``torch.profiler`` over inference or one training step, as two tables.

    python benchmarks/profile_htc.py                                  # inference, 800x1216, CPU
    python benchmarks/profile_htc.py --mode train --batch 2 --threads 2
    python benchmarks/profile_htc.py --height 320 --width 512 --trace /tmp/htc.json   # + a Chrome trace

Same model and synthetic batch as ``htc_speed.py`` (HTC R-50-FPN, random weights, 80 classes, semantic
head). The first table is the model's named parts (``record_function`` scopes in ``Detector`` and
``CascadeRoIHead``: backbone, neck, rpn_head, rpn_proposals, semantic_head, box_stage{t}, nms, mask_heads,
paste_masks, ...), the second the ``--top`` operators by self time. The profiled step is the median-timed
one of ``--runs`` after ``--warmup``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from htc_speed import synthetic_batch  # noqa: E402

from htc_lightning.tools.mmdet_parity import build_detector  # noqa: E402

# the record_function scopes of Detector / CascadeRoIHead; nested ones are indented in the table
PARTS = ("backbone", "neck", "rpn_head", "rpn_proposals", "roi_head", "semantic_head", "assign_sample",
         "box_stage0", "box_stage1", "box_stage2", "mask_stage0", "mask_stage1", "mask_stage2", "nms",
         "mask_heads", "paste_masks")
TOP_LEVEL = ("backbone", "neck", "rpn_head", "rpn_proposals", "roi_head")


def make_step(det, images, targets, mode: str):
    metas = [t["meta"] for t in targets]
    if mode == "inference":
        det.eval()
        return lambda: det.predict(images, metas)
    det.train()
    opt = torch.optim.SGD(det.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        losses = det.loss(images, targets)
        sum(losses.values()).backward()
        opt.step()
    return step


def main(argv: list[str] | None = None) -> dict:
    """Profiles, prints the two tables and returns them: ``parts`` {name: ms} and ``operators`` [(name, calls, ms,
    % of the step)], hottest first."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT.parent / "configs" / "htc" / "htc_r50_fpn_1x_coco.yaml"))
    ap.add_argument("--mode", choices=["inference", "train"], default="inference")
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1216)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--trace", help="also write a Chrome trace of the profiled step here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    det = build_detector(args.config, ["backbone.init_args.pretrained=false", "num_classes=80"])
    images, targets = synthetic_batch(args.batch, args.height, args.width, args.objects)
    step = make_step(det, images, targets, args.mode)
    for _ in range(args.warmup):
        step()
    # profile every timed run and keep the median one: one slow outlier does not decide the table
    runs = []
    for _ in range(args.runs):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step()
            wall = time.perf_counter() - t0
        runs.append((wall, prof))
    walls = [w for w, _ in runs]
    wall, prof = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    if args.trace:
        prof.export_chrome_trace(args.trace)

    events = {e.key: e for e in prof.key_averages()}
    total_us = wall * 1e6
    print(f"\nHTC R-50-FPN {args.mode}, batch {args.batch}, {args.height}x{args.width}, {args.threads} threads "
          f"({os.cpu_count()} cores); profiled step {wall:.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls)}, "
          f"median {statistics.median(walls):.2f} s; the profiler adds a little)")
    print(f"\n| {'part':22s} | {'ms':>9s} | {'% step':>6s} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 8}|")
    accounted = 0.0
    parts: dict[str, float] = {}
    for name in PARTS:
        e = events.get(name)
        if e is None:
            continue
        us = e.cpu_time_total
        if name in TOP_LEVEL:
            accounted += us
        label = name if name in TOP_LEVEL else f"  {name}"
        parts[name] = us / 1e3
        print(f"| {label:22s} | {us / 1e3:9.1f} | {100 * us / total_us:6.1f} |")
    rest = "rest (backward, optimizer)" if args.mode == "train" else "rest"
    print(f"| {rest:22s} | {(total_us - accounted) / 1e3:9.1f} | {100 * (total_us - accounted) / total_us:6.1f} |")

    ops = sorted((e for e in prof.key_averages() if e.key not in PARTS and not e.key.startswith("ProfilerStep")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    print(f"\n| {'operator (self time)':40s} | {'calls':>6s} | {'ms':>9s} | {'% step':>6s} |")
    print(f"|{'-' * 42}|{'-' * 8}|{'-' * 11}|{'-' * 8}|")
    for e in ops:
        print(f"| {e.key[:40]:40s} | {e.count:6d} | {e.self_cpu_time_total / 1e3:9.1f} | "
              f"{100 * e.self_cpu_time_total / total_us:6.1f} |")
    return {"parts": parts, "operators": [(e.key, e.count, e.self_cpu_time_total / 1e3,
                                           100 * e.self_cpu_time_total / total_us) for e in ops]}


if __name__ == "__main__":
    main()
