"""RoIAlign on CPU: torchvision's kernels (the default) vs the opt-in ``htc_lightning.accel.roi_align_cpu``.

Features (``--batch``, ``--channels``, ``--size`` x ``--size``) at ``--stride``; RoIs of ``--min-roi`` ..
``--max-roi`` input pixels on random images. For each thread count, output size and RoI count: forward and
backward time of both, median of ``--runs`` after one warm-up, and the max abs difference of the outputs and
of the feature gradients. ``--avg-pool 2`` times HTC's box-branch semantic feature instead: torchvision's
RoIAlign then ``adaptive_avg_pool2d`` to half the size, against ours with the pooling folded in.

    python benchmarks/roi_align_speed.py                       # 1 and 2 threads, 7x7 and 14x14
    python benchmarks/roi_align_speed.py --rois 256 1024 --threads 1 --runs 5
    python benchmarks/roi_align_speed.py --batch 1 --channels 256 --size 100 --stride 8 --max-roi 400 \\
        --outputs 14 --avg-pool 2 --rois 1000            # HTC's semantic RoI feature for 1000 proposals
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align as tv_roi_align

from htc_lightning.accel.roi_align_cpu import roi_align


def make_rois(n: int, batch: int, image_size: float, min_roi: float, max_roi: float,
              g: torch.Generator) -> torch.Tensor:
    wh = min_roi + torch.rand(n, 2, generator=g) * (max_roi - min_roi)
    xy = torch.rand(n, 2, generator=g) * (image_size - wh).clamp(min=1)
    b = torch.randint(0, batch, (n, 1), generator=g).float()
    return torch.cat([b, xy, xy + wh], 1)


def time_both(fn, feat: torch.Tensor, rois: torch.Tensor, size: int, scale: float, upstream: torch.Tensor,
              runs: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(median forward seconds, median backward seconds, output, feature gradient)."""
    fwd, bwd = [], []
    for _ in range(runs + 1):
        x = feat.detach().requires_grad_(True)
        t0 = time.perf_counter()
        out = fn(x, rois, size, scale)
        t1 = time.perf_counter()
        out.backward(upstream)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return statistics.median(fwd[1:]), statistics.median(bwd[1:]), out.detach(), x.grad


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
    parser.add_argument("--avg-pool", type=int, default=1, help="pool the output by this factor (HTC: 2)")
    args = parser.parse_args()
    pool = args.avg_pool

    def reference(x, rois, size, scale):
        out = tv_roi_align(x, rois, size, scale, 0, True)
        return F.adaptive_avg_pool2d(out, size // pool) if pool > 1 else out

    def ours(x, rois, size, scale):
        return roi_align(x, rois, size, scale, 0, True, avg_pool=pool)

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(args.batch, args.channels, args.size, args.size, generator=g)
    scale = 1.0 / args.stride
    print(f"features {tuple(feat.shape)} at stride {args.stride}; rois {args.min_roi:g}-{args.max_roi:g} px; "
          f"median of {args.runs}")
    print(f"{'threads':>7} {'out':>5} {'rois':>6} | {'tv fwd ms':>9} {'ours fwd ms':>11} {'speed-up':>8} "
          f"{'max |diff|':>10} | {'tv bwd ms':>9} {'ours bwd ms':>11} {'speed-up':>8} {'max |diff|':>10}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.outputs:
            for n in args.rois:
                rois = make_rois(n, args.batch, args.size * args.stride, args.min_roi, args.max_roi, g)
                upstream = torch.randn(n, args.channels, size // pool, size // pool, generator=g)
                tv_fwd, tv_bwd, tv_out, tv_grad = time_both(reference, feat, rois, size, scale, upstream, args.runs)
                our_fwd, our_bwd, our_out, our_grad = time_both(ours, feat, rois, size, scale, upstream, args.runs)
                d_out = (our_out - tv_out).abs().max().item()
                d_grad = (our_grad - tv_grad).abs().max().item()
                print(f"{threads:>7} {size:>5} {n:>6} | {1000 * tv_fwd:>9.1f} {1000 * our_fwd:>11.1f} "
                      f"{tv_fwd / our_fwd:>7.1f}x {d_out:>10.2e} | {1000 * tv_bwd:>9.1f} {1000 * our_bwd:>11.1f} "
                      f"{tv_bwd / our_bwd:>7.1f}x {d_grad:>10.2e}")

if __name__ == "__main__":
    main()
