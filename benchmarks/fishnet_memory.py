"""Peak memory of one FishNet training step (forward + backward, batch 1) at several input sizes.

Each size runs in a fresh process so that the peak resident set size (``ru_maxrss``) belongs to that size alone.
On CPU the table reports peak RSS and the part added by the step over the built model; with ``--device cuda`` it
reports ``torch.cuda.max_memory_allocated`` (optionally under ``--amp`` bf16/fp16 autocast). A least-squares line
over pixels extrapolates the step's memory to the detection size (800×1344 by default).

    python benchmarks/fishnet_memory.py                       # CPU, FishNet-150, 256..640 squares
    python benchmarks/fishnet_memory.py --sizes 512x512 800x1344 --device cuda --amp fp16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _measure(depth: int, height: int, width: int, device: str, amp: str | None) -> dict:
    import torch

    from htc_lightning.models.backbones import FishNet

    torch.manual_seed(0)
    model = FishNet(depth, out_indices=(6, 7, 8, 9), norm_eval=True, frozen_stages=-1).to(device).train()
    images = torch.randn(1, 3, height, width, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb() * 2**20
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp or "", None)
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
        outs = model(images)
        loss = sum(o.float().mean() for o in outs)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_mb() * 2**20
    return {"size": f"{height}x{width}", "pixels": height * width, "base_mb": base / 2**20, "peak_mb": peak / 2**20,
            "seconds": time.perf_counter() - start}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _fit(rows: list[dict]) -> tuple[float, float]:
    """Step memory (peak - base) = a + b * pixels, least squares."""
    xs = [r["pixels"] for r in rows]
    ys = [r["peak_mb"] - r["base_mb"] for r in rows]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if n > 1 and var else my / mx
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=150, choices=[99, 150, 201])
    parser.add_argument("--sizes", nargs="+", default=["256x256", "384x384", "512x512", "640x640"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default=None, choices=["fp16", "bf16"])
    parser.add_argument("--target", default="800x1344", help="size to extrapolate to (multiple of 32)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        h, w = map(int, args.worker.split("x"))
        print(json.dumps(_measure(args.depth, h, w, args.device, args.amp)))
        return

    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--worker", size, "--depth", str(args.depth), "--device", args.device]
        if args.amp:
            cmd += ["--amp", args.amp]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    what = "CUDA max allocated" if args.device == "cuda" else "peak RSS"
    print(f"FishNet-{args.depth} training step, batch 1, {args.device}, amp={args.amp or 'off'} ({what}, MiB)")
    print(f"{'size':>10} {'model':>8} {'peak':>8} {'step':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['size']:>10} {r['base_mb']:8.0f} {r['peak_mb']:8.0f} {r['peak_mb'] - r['base_mb']:8.0f} "
              f"{r['seconds']:8.1f}")
    a, b = _fit(rows)
    th, tw = map(int, args.target.split("x"))
    step = a + b * th * tw
    print(f"linear fit: step = {a:.0f} MiB + {b * 1e6:.1f} MiB per megapixel; at {args.target}: "
          f"step ~{step:.0f} MiB, peak ~{step + rows[-1]['base_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
