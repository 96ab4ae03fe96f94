"""COCO scale: annotation set-up time and memory per rank, DataLoader worker memory, evaluation cost and data
throughput, before (the code of commit ``--before``, read with ``git show``) vs after (this checkout).

It writes a COCO-scale instances json (``--scale 1``: 118,287 images, ~825k polygons of 20 to 60 points, like
train2017) whose images are a few real photographs (``../shared/coco_tiny``, else generated JPEGs). Each
measurement runs in a fresh process, so peak memory is its own:

- set-up: ``CocoDetection(train=True)``; "before" every rank parses. "after": ``--ranks`` processes start at
  once with an empty cache (one parses, the others wait and map its file), then one more starts with the
  cache filled (the next run, or a rank that came late). RSS and USS (private memory) after set-up, above the
  process's size after imports; the shared mapping is counted once per node.
- workers: ``--workers`` forked DataLoader workers each read ``--samples`` records (``dataset.records[i]``,
  every field, in shuffled order), reporting their USS (``/proc/<pid>/smaps_rollup``) along the way.
- evaluation: ``CocoEvaluator.update`` (faster-coco-eval) on ``--eval-images`` 480x640 images with
  ``--dets`` masked detections each (from 8 detection sets reused cyclically, matching ground truth written
  for them), then ``compute``: its wall time and peak RSS above its start; the AP of both must agree to 1e-12.
- throughput: images/s of one single-threaded worker through the full-size training pipeline (decode,
  masks, resize to 1333x800, flip 0.5, normalise) on ``--throughput-images`` of the real photographs
  (data_throughput.py's loop).

    python benchmarks/data_scale.py                    # full scale, as in the issue (~30 min on 2 busy cores)
    python benchmarks/data_scale.py --scale 0.02       # a quick one
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FULL_IMAGES, EVAL_IMAGES = 118_287, 5000
BEFORE = "d824f98"  # the commit issue 26 started from
MB = 1 << 20


# -- memory of this process -----------------------------------------------------------------------------------

def _proc_kb(path: str, keys: tuple[str, ...]) -> int:
    total = 0
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                total += int(value.split()[0])
    return total * 1024


def rss() -> int:
    return _proc_kb("/proc/self/status", ("VmRSS",))


def peak_rss() -> int:
    return _proc_kb("/proc/self/status", ("VmHWM",))


def uss(pid: int | str = "self") -> int:
    return _proc_kb(f"/proc/{pid}/smaps_rollup", ("Private_Clean", "Private_Dirty"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- the data -------------------------------------------------------------------------------------------------

def real_images(folder: Path, out: Path) -> list[tuple[str, int, int]]:
    """(file name, height, width) of the photographs the json points at."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.jpg"))[:32] if folder.is_dir() else []
    if not files:  # no coco_tiny next to the checkout: 640x480 noise JPEGs stand in
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save(out / f"{i:012d}.jpg", quality=90)
        files = sorted(out.glob("*.jpg"))
    elif not (out / files[0].name).exists():
        for f in files:
            shutil.copy(f, out / f.name)
    sizes = []
    for f in files:
        with Image.open(f) as im:
            sizes.append((f.name, im.height, im.width))
    return sizes


def write_scale_json(path: Path, num_images: int, images: list[tuple[str, int, int]], seed: int = 0) -> int:
    """A train2017-like json, written in chunks; returns the number of polygons."""
    rng = np.random.default_rng(seed)
    categories = [{"supercategory": "thing", "id": c, "name": f"class{c}"} for c in range(1, 91) if c % 9]
    cat_ids = [c["id"] for c in categories]
    ann_id, tmp = 0, path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "COCO-scale synthetic"}, "images": [')
        f.write(",".join(json.dumps({
            "license": 1 + i % 7, "file_name": images[i % len(images)][0],
            "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
            "height": images[i % len(images)][1], "width": images[i % len(images)][2],
            "date_captured": "2013-11-14 16:28:13", "flickr_url": f"http://farm4.staticflickr.com/{i}.jpg",
            "id": i + 1}) for i in range(num_images)))
        f.write('], "annotations": [')
        first = True
        for start in range(0, num_images, 2000):
            anns = []
            for i in range(start, min(start + 2000, num_images)):
                _, h, w = images[i % len(images)]
                for _ in range(int(rng.integers(1, 14))):  # 7 a picture on average, as train2017
                    k = int(rng.integers(20, 61))
                    r = rng.uniform(4, min(h, w) / 3)
                    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
                    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
                    radii = r * rng.uniform(0.6, 1.0, k)
                    xs = np.clip(cx + radii * np.cos(angles), 0, w).round(2)
                    ys = np.clip(cy + radii * np.sin(angles), 0, h).round(2)
                    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
                    x0, y0 = float(xs.min()), float(ys.min())
                    ann_id += 1
                    anns.append({"segmentation": [np.stack([xs, ys], 1).ravel().tolist()], "area": round(area, 2),
                                 "iscrowd": int(rng.random() < 0.01), "image_id": i + 1,
                                 "bbox": [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)],
                                 "category_id": cat_ids[int(rng.integers(len(cat_ids)))], "id": ann_id})
            if anns:
                f.write(("" if first else ",") + json.dumps(anns)[1:-1])
                first = False
        f.write('], "categories": ' + json.dumps(categories) + "}")
    os.replace(tmp, path)
    return ann_id


def module_at(commit: str | None, relative: str, workdir: Path):
    """A module of this package as of ``commit`` (None: this checkout), loaded under a name of its own."""
    if commit is None:
        return importlib.import_module(relative.removesuffix(".py").replace("/", "."))
    source = subprocess.run(["git", "show", f"{commit}:{relative}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = workdir / "before" / relative.replace("/", "__")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    package = relative.rpartition("/")[0].replace("/", ".")
    importlib.import_module(package)  # its relative imports resolve against this checkout's package
    spec = importlib.util.spec_from_file_location(f"{package}._before_{Path(relative).stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- the measurements, each in a child process ----------------------------------------------------------------

class TouchRecords:
    """What a training worker reads of the annotations for one sample, without decoding the image."""

    def __init__(self, dataset, order: np.ndarray, checkpoints: set[int]):
        self.dataset, self.order, self.checkpoints = dataset, order, checkpoints

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        import torch.utils.data as tud
        info, anns = self.dataset.records[int(self.order[k])]
        total = len(info["file_name"]) + info["height"] + info["width"]
        for ann in anns:
            total += ann["category_id"] + ann["iscrowd"] + sum(ann["bbox"])
            total += sum(len(part) for part in ann["segmentation"])
        worker = tud.get_worker_info()
        count = k // worker.num_workers + 1  # samples this worker has read (the sampler deals them in turn)
        return (worker.id, count, uss()) if count in self.checkpoints else None


def child_dataset(args) -> dict:
    import torch

    torch.set_num_threads(1)
    coco = module_at(args.commit, "htc_lightning/data/coco.py", Path(args.workdir))
    if args.commit is None:  # a small --scale still goes through the cache
        importlib.import_module("htc_lightning.data.packed").CACHE_MIN_BYTES = 0
    base_rss, base_uss = rss(), uss()
    reset_peak_rss()
    t0 = time.perf_counter()
    dataset = coco.CocoDetection(args.ann, args.images, train=True)
    seconds = time.perf_counter() - t0
    # the rank that parses does it in a forked process (see htc_lightning/data/packed.py): its peak counts too
    parser_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out = {"seconds": seconds, "rss": rss() - base_rss, "uss": uss() - base_uss,
           "peak": max(peak_rss(), parser_peak) - base_rss,
           "images": len(dataset), "mapped": getattr(dataset.records, "_path", None) is not None,
           "shared": getattr(dataset.records, "nbytes", 0)}
    if args.samples:
        checkpoints = sorted({1, *(c for c in (1000, 4000) if c < args.samples), args.samples})
        order = np.random.default_rng(0).permutation(len(dataset))
        order = np.resize(order, args.samples * args.workers)
        loader = torch.utils.data.DataLoader(TouchRecords(dataset, order, set(checkpoints)), batch_size=None,
                                             num_workers=args.workers, collate_fn=lambda x: x,
                                             multiprocessing_context="fork")
        seen: dict[int, dict[int, int]] = {}
        for item in loader:
            if item is not None:
                seen.setdefault(item[1], {})[item[0]] = item[2]
        out["workers"] = {c: float(np.mean(list(seen[c].values()))) for c in checkpoints}
    return out


def child_eval(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from eval_speed import make_detections

    torch.set_num_threads(1)
    evaluation = module_at(args.commit, "htc_lightning/evaluation/coco.py", Path(args.workdir))
    g = torch.Generator().manual_seed(0)
    templates = json.loads(Path(args.ann).with_suffix(".templates.json").read_text())
    pool = [make_detections(torch.tensor(t["boxes"]), torch.tensor(t["labels"]), args.dets, 480, 640, 80, g)
            for t in templates]
    evaluator = evaluation.CocoEvaluator(args.ann, backend="faster_coco_eval")
    wall = cpu = 0.0
    for image_id in range(1, args.eval_images + 1):
        det = pool[(image_id - 1) % len(pool)]
        w0, c0 = time.perf_counter(), time.process_time()
        evaluator.update([det], [{"image_id": image_id, "orig_size": (480, 640)}])
        wall, cpu = wall + time.perf_counter() - w0, cpu + time.process_time() - c0
    del pool
    evaluator._ground_truth()  # the ground truth is loaded once per run, outside what compute() costs
    start = rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    metrics = evaluator.compute()
    return {"update_ms": 1000 * wall / args.eval_images, "update_cpu_ms": 1000 * cpu / args.eval_images,
            "compute_s": time.perf_counter() - t0, "compute_peak": peak_rss() - start, "metrics": metrics}


def write_eval_json(path: Path, num_images: int) -> None:
    """Ground truth for the evaluation: 8 templates of 7 diamond-shaped objects, image i is template i % 8."""
    import pycocotools.mask as mask_util
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from eval_speed import random_boxes

    g = torch.Generator().manual_seed(1)
    templates, images, anns = [], [], []
    for _ in range(8):
        boxes = random_boxes(7, 480, 640, g)
        templates.append({"boxes": boxes.tolist(), "labels": torch.randint(0, 80, (7,), generator=g).tolist()})
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": 480, "width": 640, "file_name": f"{image_id:012d}.jpg"})
        t = templates[(image_id - 1) % 8]
        for (x1, y1, x2, y2), label in zip(t["boxes"], t["labels"]):
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            polygon = [[cx, y1, x2, cy, cx, y2, x1, cy]]
            area = float(mask_util.area(mask_util.merge(mask_util.frPyObjects(polygon, 480, 640))))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "segmentation": polygon})
    categories = [{"id": c + 1, "name": f"class{c + 1}"} for c in range(80)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    path.with_suffix(".templates.json").write_text(json.dumps(templates))


def child_throughput(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from data_throughput import images_per_second

    from htc_lightning.data import DetectionTransform

    torch.set_num_threads(1)
    coco = module_at(args.commit, "htc_lightning/data/coco.py", Path(args.workdir))
    dataset = coco.CocoDetection(args.ann, args.images, DetectionTransform([(1333, 800)], flip_prob=0.5),
                                 train=True)
    wall, cpu = images_per_second(dataset, runs=3)
    return {"wall": float(np.median(wall)), "cpu": float(np.median(cpu))}


CHILDREN = {"dataset": child_dataset, "eval": child_eval, "throughput": child_throughput}


def run_child(args, kind: str, commit: str | None, ann: Path, background: bool = False, **extra):
    command = [sys.executable, __file__, "--child", kind, "--workdir", str(args.workdir), "--ann", str(ann),
               "--images", str(args.workdir / "images"), "--workers", str(args.workers),
               "--eval-images", str(args.eval_images), "--dets", str(args.dets),
               "--samples", str(extra.get("samples", 0))] + (["--commit", commit] if commit else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HTC_LIGHTNING_ANN_CACHE": str(args.workdir / "cache")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    return proc if background else collect(proc, kind)


def collect(proc, kind: str) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"the {kind} measurement failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


# -- the table ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    """Measures, prints the table and returns the measurements behind it: ``dataset`` {"before", "cold" (one per
    rank), "warm"}, ``eval`` [before, after] with ``eval_max_diff``, ``throughput`` [before, after] (what was not
    skipped)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of train2017's 118,287 images")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/htc_lightning_data_scale"),
                        help="where the json (kept for the next run at the same scale) and the cache go")
    parser.add_argument("--before", default=BEFORE, help="the commit whose code is 'before'")
    parser.add_argument("--coco-tiny", type=Path, default=ROOT.parent / "shared" / "coco_tiny" / "train2017")
    parser.add_argument("--ranks", type=int, default=2, help="processes starting at once on an empty cache")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8000, help="records each worker reads")
    parser.add_argument("--eval-images", type=int, default=None, help=f"default: {EVAL_IMAGES} x scale")
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--throughput-images", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], choices=["dataset", "eval", "throughput"])
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--ann", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--commit", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return {}
    args.eval_images = args.eval_images or max(50, round(EVAL_IMAGES * args.scale))
    args.workdir.mkdir(parents=True, exist_ok=True)
    num_images = max(100, round(FULL_IMAGES * args.scale))
    t0 = time.perf_counter()
    images = real_images(args.coco_tiny, args.workdir / "images")
    ann = args.workdir / f"instances_{num_images}.json"
    if not ann.exists():
        polygons = write_scale_json(ann, num_images, images)
        print(f"wrote {ann} ({ann.stat().st_size / MB:.0f} MiB, {num_images} images, {polygons} polygons) "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
    small = args.workdir / f"instances_small_{args.throughput_images}.json"
    if not small.exists():
        write_scale_json(small, min(args.throughput_images, len(images)), images, seed=1)
    eval_ann = args.workdir / f"eval_{args.eval_images}.json"
    if not eval_ann.exists():
        write_eval_json(eval_ann, args.eval_images)

    rows: list[tuple[str, str, str, str]] = []
    result: dict = {}
    if "dataset" not in args.skip:
        before = run_child(args, "dataset", args.before, ann, samples=args.samples)
        print("before:", before, flush=True)
        shutil.rmtree(args.workdir / "cache", ignore_errors=True)
        cold = [collect(p, "dataset") for p in [run_child(args, "dataset", None, ann, background=True)
                                                for _ in range(args.ranks)]]
        warm = run_child(args, "dataset", None, ann, samples=args.samples)
        print("after (empty cache):", cold, "\nafter (cache filled):", warm, flush=True)
        result["dataset"] = {"before": before, "cold": cold, "warm": warm}
        builder = max(cold, key=lambda r: r["peak"])
        waiters = [r for r in cold if r is not builder]
        n = before["images"]
        rows += [
            ("set-up, the rank that parses (s)", f"{before['seconds']:.1f}", f"{builder['seconds']:.1f}", "<= 10"),
            (f"set-up, the other {args.ranks - 1} rank(s) (s)", f"{before['seconds']:.1f}",
             ", ".join(f"{r['seconds']:.1f}" for r in waiters) or "-", "<= 10"),
            ("set-up, cache filled (next run) (s)", f"{before['seconds']:.1f}", f"{warm['seconds']:.1f}", "<= 10"),
            ("annotations per rank, USS (MB)", f"{before['uss'] / MB:.0f}",
             f"{builder['uss'] / MB:.0f} parsing rank, {warm['uss'] / MB:.0f} mapping", "<= 1024"),
            ("annotations per rank, RSS (MB)", f"{before['rss'] / MB:.0f}",
             f"{builder['rss'] / MB:.0f} parsing rank, {warm['rss'] / MB:.0f} mapping (shared)", ""),
            ("peak RSS during set-up (MB)", f"{before['peak'] / MB:.0f}",
             f"{builder['peak'] / MB:.0f} parsing rank, {warm['peak'] / MB:.0f} mapping", ""),
            ("annotations, 8 ranks of a node (MB)", f"{8 * before['uss'] / MB:.0f}",
             f"{(builder['uss'] + 7 * warm['uss'] + warm['shared']) / MB:.0f} ({warm['shared'] / MB:.0f} shared)",
             ""),
        ]
        for label, key in (("worker USS at {} samples (MB)", "workers"),):
            for c in before[key]:
                rows.append((label.format(c), f"{before[key][c] / MB:.0f}", f"{warm[key][c] / MB:.0f}", ""))
        marks = [c for c in before["workers"]]
        warm_from = "1000" if "1000" in marks else marks[0]
        grow = [(r["workers"][marks[-1]] - r["workers"][warm_from]) / MB for r in (before, warm)]
        rows.append((f"worker growth, {warm_from} -> {marks[-1]} samples (MB)", f"{grow[0]:.1f}", f"{grow[1]:.1f}",
                     "<= 5"))
        rows.insert(0, ("images kept (train=True)", str(n), str(warm["images"]), ""))
    if "eval" not in args.skip:
        evals = [run_child(args, "eval", commit, eval_ann) for commit in (args.before, None)]
        print("evaluation:", evals, flush=True)
        diff = max(abs(evals[0]["metrics"][k] - evals[1]["metrics"][k]) for k in evals[0]["metrics"])
        result.update(eval=evals, eval_max_diff=diff)
        rows += [
            (f"eval update, {args.dets} masks (ms/image, wall / CPU)",
             *(f"{e['update_ms']:.1f} / {e['update_cpu_ms']:.1f}" for e in evals), "<= 20"),
            (f"eval compute, {args.eval_images} images (s)", *(f"{e['compute_s']:.1f}" for e in evals), ""),
            ("eval compute, peak RSS above its start (MB)", *(f"{e['compute_peak'] / MB:.0f}" for e in evals), ""),
            ("eval segm mAP / bbox mAP", *(f"{e['metrics']['segm_mAP']:.4f} / {e['metrics']['bbox_mAP']:.4f}"
                                          for e in evals), f"max diff {diff:.1e}"),
        ]
        if diff > 1e-12:
            raise SystemExit(f"before and after disagree on the AP by {diff}")
    if "throughput" not in args.skip:
        tputs = [run_child(args, "throughput", commit, small) for commit in (args.before, None)]
        result["throughput"] = tputs
        rows.append(("images/s per worker, 1333x800 flip masks (wall / CPU)",
                     *(f"{t['wall']:.1f} / {t['cpu']:.1f}" for t in tputs), ">= 40"))

    load = os.getloadavg()[0]
    print(f"\n{num_images} images in {ann.name} ({ann.stat().st_size / MB:.0f} MiB); before = {args.before}, "
          f"after = this checkout; {os.cpu_count()} CPU cores, load average {load:.1f} (timings on a shared "
          f"machine are noisy); max RSS of this driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MB")
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[i]) for r in rows + [("", "before", "after", "goal")]) for i in (1, 2, 3)]
    print(f"| {'measure':<{width}} | {'before':>{cols[0]}} | {'after':>{cols[1]}} | {'goal':>{cols[2]}} |")
    print(f"| {'-' * width} | {'-' * cols[0]} | {'-' * cols[1]} | {'-' * cols[2]} |")
    for name, b, a, goal in rows:
        print(f"| {name:<{width}} | {b:>{cols[0]}} | {a:>{cols[1]}} | {goal:>{cols[2]}} |")
    return result


if __name__ == "__main__":
    main()
