"""HTC R-50-FPN speed and memory: inference per image, one training step, peak memory.

    python benchmarks/htc_speed.py                       # ours, CPU, fp32, 800x1216
    python benchmarks/htc_speed.py --vs-mmdet --mmcv-shim ../shared/oracle   # and mmdetection, same run
    python benchmarks/htc_speed.py --device cuda --precisions 32 16-mixed bf16-mixed --channels-last
    python benchmarks/htc_speed.py --threads 2 --vectorised-roi-align   # and with the opt-in CPU RoIAlign

Random weights, 80 classes, semantic head; training batches carry ``--objects`` boxes with masks and a
semantic map per image. Each measurement runs in a fresh process so that its peak memory (RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU) is its own. Prints the median of ``--runs`` timed runs after
``--warmup`` untimed ones. ``--vs-mmdet`` needs mmdet importable (the oracle's venv with this project
installed: ``bash ../shared/oracle/setup.sh VENV .``).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def synthetic_batch(batch: int, h: int, w: int, objects: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, h, w, generator=g)
    targets = []
    for i in range(batch):
        xy = torch.rand(objects, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 32 + torch.rand(objects, 2, generator=g) * torch.tensor([w * 0.25, h * 0.25])
        boxes = torch.cat([xy, xy + wh], 1).round()
        masks = torch.zeros(objects, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        semantic = torch.randint(0, 183, (h // 8, w // 8), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, 80, (objects,), generator=g), "masks": masks,
                        "semantic": semantic.long(), "crowd_boxes": torch.zeros(0, 4),
                        "meta": {"image_id": i, "orig_size": (h, w), "img_size": (h, w), "pad_size": (h, w),
                                 "scale_factor": (1.0, 1.0), "flip": False}})
    return images, targets


def _peak_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _time(fn, runs: int, warmup: int, device: str) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours_model_and_batch(opts: dict):
    """Our HTC (random weights, COCO's 80 classes) on ``opts["device"]`` and its synthetic batch."""
    from htc_lightning.tools.mmdet_parity import build_detector

    device = opts["device"]
    # no data module here to link the class count from
    det = build_detector(opts["config"], ["backbone.init_args.pretrained=false",
                                          "num_classes=80"]).to(device)
    images, targets = synthetic_batch(opts["batch"], opts["height"], opts["width"], opts["objects"])
    images = images.to(device)
    targets = [{k: (v.to(device) if hasattr(v, "to") else v) for k, v in t.items()} for t in targets]
    return det, images, targets


def _measure_ours(opts: dict) -> dict:
    import torch

    torch.set_num_threads(opts["threads"])
    device = opts["device"]
    det, images, targets = ours_model_and_batch(opts)
    if opts.get("vectorised_roi_align"):
        from htc_lightning.accel.roi_align_cpu import use_vectorised_roi_align

        use_vectorised_roi_align(det)
    if opts["channels_last"]:
        det = det.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    precision = opts["precision"]
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    autocast = (lambda: torch.autocast(device_type=device, dtype=dtype)) if dtype else None
    if opts["compile"]:
        det.backbone = torch.compile(det.backbone)
        det.neck = torch.compile(det.neck)
    metas = [t["meta"] for t in targets]
    if opts["mode"] == "inference":
        det.eval()

        def step():
            with torch.no_grad(), (autocast() if autocast else _null()):
                det.predict(images, metas)
    else:
        det.train()
        opt = torch.optim.SGD(det.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(device) if precision == "16-mixed" else None

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast() if autocast else _null():
                losses = det.loss(images, targets)
                loss = sum(losses.values())
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _time(step, opts["runs"], opts["warmup"], device)
    return {"seconds": seconds, "peak_gb": _peak_memory(device)}


def mmdet_model_and_samples(opts: dict):
    """mmdetection 3.3.0's HTC R-50-FPN (mmcv's operators from the oracle's torchvision shim, random weights
    by its own init) on ``opts.get("device", "cpu")``, with the batch of ``synthetic_batch`` as its inputs."""

    sys.path.insert(0, opts["mmcv_shim"])
    import mmcv_ops_shim

    mmcv_ops_shim.install()
    import mmdet
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import MODELS
    from mmengine.structures import InstanceData, PixelData

    register_all_modules()
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "htc",
                                       "htc_r50_fpn_1x_coco.py"))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    images, targets = synthetic_batch(opts["batch"], opts["height"], opts["width"], opts["objects"])
    h, w = opts["height"], opts["width"]
    samples = []
    for t in targets:
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                                        scale_factor=(1.0, 1.0), flip=False, img_id=0))
        gt = InstanceData()
        gt.bboxes, gt.labels = t["boxes"], t["labels"]
        gt.masks = BitmapMasks(t["masks"].numpy(), h, w)
        s.gt_instances = gt
        s.gt_sem_seg = PixelData(sem_seg=t["semantic"][None])
        samples.append(s)
    device = opts.get("device", "cpu")
    if device != "cpu":
        model = model.to(device)
        images = images.to(device)
        samples = [s.to(device) for s in samples]
    return model, images, samples


def _measure_mmdet(opts: dict) -> dict:
    import torch

    torch.set_num_threads(opts["threads"])
    device = opts["device"]
    model, images, samples = mmdet_model_and_samples(opts)
    if opts["mode"] == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                model.predict(images, samples)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            losses = model.loss(images, samples)
            loss, _ = model.parse_losses(losses)
            loss.backward()
            opt.step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _time(step, opts["runs"], opts["warmup"], device)
    return {"seconds": seconds, "peak_gb": _peak_memory(device)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _worker(fn, opts: dict, queue) -> None:
    try:
        queue.put((globals()[fn] if isinstance(fn, str) else fn)(opts))
    except Exception as err:  # report, don't hang the parent
        queue.put({"error": f"{type(err).__name__}: {err}"})


def run_isolated(fn, opts: dict) -> dict:
    """``fn(opts)`` (a name in this module, or a module-level function) in a fresh process: its result, or
    ``{"error": ...}``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(fn, opts, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    """Measures, prints the table and returns its rows (``impl``, ``mode``, ``batch``, ``precision``, ``flags`` and
    the measurement: ``seconds``, ``peak_gb`` or ``error``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "htc" / "htc_r50_fpn_1x_coco.yaml"))
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1216)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], help="for the training step")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precisions", nargs="+", default=["32"], choices=["32", "16-mixed", "bf16-mixed"])
    ap.add_argument("--channels-last", action="store_true", help="also measure with channels_last")
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile on backbone+neck")
    ap.add_argument("--vectorised-roi-align", action="store_true",
                    help="also measure with the opt-in CPU RoIAlign (htc_lightning.accel.roi_align_cpu)")
    ap.add_argument("--vs-mmdet", action="store_true", help="also measure mmdetection's HTC (fp32, on --device)")
    ap.add_argument("--mmcv-shim", default=str(ROOT.parent / "shared" / "oracle"),
                    help="folder holding mmcv_ops_shim.py")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)

    base = dict(config=args.config, height=args.height, width=args.width, objects=args.objects, runs=args.runs,
                warmup=args.warmup, threads=args.threads, device=args.device, mmcv_shim=args.mmcv_shim)
    variants = [(p, False, False, False) for p in args.precisions]
    if args.channels_last:
        variants += [(p, True, False, False) for p in args.precisions]
    if args.compile:
        variants += [(p, False, True, False) for p in args.precisions]
    if args.vectorised_roi_align:
        variants += [(p, False, False, True) for p in args.precisions]
    jobs = [("inference", 1)] + ([] if args.skip_train else [("train", b) for b in args.batch_sizes])
    rows = []
    for mode, batch in jobs:
        ref = None
        if args.vs_mmdet:
            ref = run_isolated("_measure_mmdet", {**base, "mode": mode, "batch": batch})
            rows.append(("mmdet 3.3.0", mode, batch, "32", "", ref, None))
        for precision, cl, comp, vec in variants:
            res = run_isolated("_measure_ours", {**base, "mode": mode, "batch": batch, "precision": precision,
                                                 "channels_last": cl, "compile": comp, "vectorised_roi_align": vec})
            flags = ",".join(f for f, on in (("channels_last", cl), ("compile", comp), ("vectorised_roi_align", vec))
                             if on)
            rows.append(("htc-lightning", mode, batch, precision, flags, res, ref))

    print(f"\nHTC R-50-FPN at {args.height}x{args.width}, device {args.device}, {args.threads} threads "
          f"({os.cpu_count()} cores), median of {args.runs} after {args.warmup} warm-up")
    head = f"| {'impl':14s} | {'mode':9s} | batch | {'precision':10s} | {'flags':20s} | {'s/iter':>8s} | " \
           f"{'img/s':>7s} | {'peak GB':>8s} | {'vs mmdet':>8s} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for impl, mode, batch, precision, flags, res, ref in rows:
        if "error" in res:
            print(f"| {impl:14s} | {mode:9s} | {batch:5d} | {precision:10s} | {flags:20s} | error: {res['error']}")
            continue
        ratio = f"{res['seconds'] / ref['seconds']:.2f}x" if ref and "seconds" in ref else ""
        print(f"| {impl:14s} | {mode:9s} | {batch:5d} | {precision:10s} | {flags:20s} | {res['seconds']:8.3f} | "
              f"{batch / res['seconds']:7.2f} | {res['peak_gb']:8.2f} | {ratio:>8s} |")
    return [{"impl": impl, "mode": mode, "batch": batch, "precision": precision, "flags": flags, **res}
            for impl, mode, batch, precision, flags, res, _ in rows]


if __name__ == "__main__":
    main()
