"""RoIAlign backward on CPU: torchvision's ``_roi_align_backward`` vs ``htc_lightning.models.layers.roi_align``.

Features (``--batch``, ``--channels``, ``--size`` x ``--size``) at ``--stride``; RoIs of ``--min-roi`` ..
``--max-roi`` input pixels on random images. For each thread count, output size and RoI count: the forward
time (torchvision's, shared by both), and the backward time of both, median of ``--runs`` after one warm-up,
plus the max abs difference of the two feature gradients.

    python benchmarks/roi_align_speed.py                       # 1 and 2 threads, 7x7 and 14x14
    python benchmarks/roi_align_speed.py --rois 256 1024 --threads 1 --runs 5
"""
import argparse
import statistics
import time

import torch
from torchvision.ops import roi_align as tv_roi_align

from htc_lightning.models.layers.roi_align import roi_align


def make_rois(n: int, batch: int, image_size: float, min_roi: float, max_roi: float,
              g: torch.Generator) -> torch.Tensor:
    wh = min_roi + torch.rand(n, 2, generator=g) * (max_roi - min_roi)
    xy = torch.rand(n, 2, generator=g) * (image_size - wh).clamp(min=1)
    b = torch.randint(0, batch, (n, 1), generator=g).float()
    return torch.cat([b, xy, xy + wh], 1)


def time_backward(fn, feat: torch.Tensor, rois: torch.Tensor, size: int, scale: float, upstream: torch.Tensor,
                  runs: int) -> tuple[float, float, torch.Tensor]:
    """(median forward seconds, median backward seconds, feature gradient)."""
    fwd, bwd = [], []
    for _ in range(runs + 1):
        x = feat.detach().requires_grad_(True)
        t0 = time.perf_counter()
        out = fn(x, rois, size, scale, 0, True)
        t1 = time.perf_counter()
        out.backward(upstream)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return statistics.median(fwd[1:]), statistics.median(bwd[1:]), x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=40, help="feature map side")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--min-roi", type=float, default=10.0)
    parser.add_argument("--max-roi", type=float, default=70.0)
    parser.add_argument("--rois", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--outputs", type=int, nargs="+", default=[7, 14])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(args.batch, args.channels, args.size, args.size, generator=g)
    scale = 1.0 / args.stride
    print(f"features {tuple(feat.shape)} at stride {args.stride}; rois {args.min_roi:g}-{args.max_roi:g} px; "
          f"median of {args.runs}")
    print(f"{'threads':>7} {'out':>5} {'rois':>6} {'fwd ms':>8} {'tv bwd ms':>10} {'ours bwd ms':>12} "
          f"{'speed-up':>9} {'max |diff|':>11}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.outputs:
            for n in args.rois:
                rois = make_rois(n, args.batch, args.size * args.stride, args.min_roi, args.max_roi, g)
                upstream = torch.randn(n, args.channels, size, size, generator=g)
                fwd, tv_bwd, tv_grad = time_backward(tv_roi_align, feat, rois, size, scale, upstream, args.runs)
                _, our_bwd, our_grad = time_backward(roi_align, feat, rois, size, scale, upstream, args.runs)
                diff = (our_grad - tv_grad).abs().max().item()
                print(f"{threads:>7} {size:>5} {n:>6} {1000 * fwd:>8.1f} {1000 * tv_bwd:>10.1f} "
                      f"{1000 * our_bwd:>12.1f} {tv_bwd / our_bwd:>8.1f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
