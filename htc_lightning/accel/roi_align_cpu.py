"""An opt-in RoIAlign for CPU training and inference: torchvision's numbers, vectorised in both directions.

The model library pools with ``torchvision.ops.roi_align`` on every device. torchvision's CPU kernels are
serial and scalar: the forward interpolates every (RoI, channel, bin, sample) on its own, and the backward is
a scatter that recomputes the bilinear weights for every channel. This module computes the same numbers with
matrix products; turn it on for a model with ``use_vectorised_roi_align(model)``, or from a config with the
``VectorisedCPURoIAlign`` callback::

    trainer:
      callbacks:
        - class_path: htc_lightning.accel.roi_align_cpu.VectorisedCPURoIAlign

It changes nothing on CUDA, in other dtypes than float32/bfloat16, or while exporting (torchvision's op is
what the exporters know): there every ``MultiLevelRoIAlign`` keeps torchvision's kernels. It pays with one
intra-op thread (``torch.set_num_threads(1)``, the caller's choice): 17 % less CPU time per HTC R-50 training
step at 800x1216. With more, each of its many small ops pays a parallel-region barrier, which on shared cores
costs more than the work: at 2 threads the same step took ~30 % more CPU time than torchvision's (README, Speed).

Both directions rest on one fact: the sampling grid of a bin is a product of its y and x samples, and a
bilinear weight is a product of a y-weight and an x-weight, so RoIAlign of one RoI is ``A_y @ F @ A_x^T`` on
the window of the feature map its taps touch, where ``A_y`` (bins x window rows) and ``A_x`` (bins x window
columns) hold each bin's summed tap weights. Those are built once per RoI and applied to all channels with
matrix products.

* Forward (features of at least ``_MIN_CHANNELS`` channels, or a pooled output; narrower ones keep
  torchvision's kernel, which is faster there): RoIs with a small window are batched (their windows gathered
  as rows of channels, padded to a chunk's largest); large ones run one at a time on a strided view of the
  map, without a copy. ``avg_pool`` folds an average pooling of the output into ``A_y``/``A_x`` (HTC pools
  the 14x14 semantic RoI feature to 7x7 for its box branch), which is exact and skips the large intermediate.
* Backward: the x-contraction is a dense batched matmul over a per-RoI column window; the remaining
  y-contraction is a sparse (pixels x window-rows) matrix times the dense (window-rows x channels) result,
  accumulated with a sparse-dense ``addmm_`` (one axpy over the channels per entry).

Sample positions, the adaptive grid (``ceil(roi / bins)`` samples per bin), the out-of-map rule and the edge
clamping follow torchvision's CPU kernel (``roi_align_kernel.cpp``) operation by operation in float32, so
results match torchvision's up to the order of float summation (max abs diff ~1e-6 on unit-scale features).
"""
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from htc_lightning.models.layers.roi_extractor import MultiLevelRoIAlign
from htc_lightning.models.layers.roi_extractor import roi_align as torchvision_roi_align
from htc_lightning.models.layers.tracing import exporting

# Bound on the bytes of one chunk's intermediates. Small enough for the allocator to recycle the buffers from
# chunk to chunk: fresh large allocations pay a page fault per 4 KiB and cost more than the arithmetic.
_CHUNK_BYTES = 8 * 2**20


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    if len(output_size) != 2:
        raise ValueError(f"roi_align: output_size {output_size} must be an int or a pair")
    return int(output_size[0]), int(output_size[1])


def _roi_geometry(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int,
                  aligned: bool) -> tuple[Tensor, ...]:
    """Per-RoI start, bin size and sample count on each axis, computed in float32 like torchvision's kernel."""
    offset = 0.5 if aligned else 0.0
    scale = torch.tensor(spatial_scale, dtype=torch.float32)  # the kernel casts the scale to float first
    start_x = rois[:, 1] * scale - offset
    start_y = rois[:, 2] * scale - offset
    roi_w = (rois[:, 3] * scale - offset) - start_x
    roi_h = (rois[:, 4] * scale - offset) - start_y
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / pooled[0]
    bin_w = roi_w / pooled[1]
    if sampling_ratio > 0:
        grid_h = torch.full_like(rois[:, 0], sampling_ratio, dtype=torch.long)
        grid_w = grid_h
    else:
        # a negative or zero extent gives an empty grid (no samples, zero gradient)
        grid_h = torch.ceil(bin_h).clamp(min=0).long()
        grid_w = torch.ceil(bin_w).clamp(min=0).long()
    return start_y, bin_h, grid_h, start_x, bin_w, grid_w


def _axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, bins: int, size: int,
                  max_grid: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps of every sample along one axis: (low index, high index, low weight, high weight), each
    (K, bins, max_grid). Samples past a RoI's own grid, or outside [-1, size], get zero weight."""
    bin_idx = torch.arange(bins, dtype=torch.float32)
    sample_idx = torch.arange(max_grid)
    # same association order as the kernel: (start + p * bin) + ((i + .5) * bin / grid)
    bin_start = start[:, None] + bin_idx[None, :] * bin_size[:, None]
    in_bin = (sample_idx.float() + 0.5)[None, :] * bin_size[:, None] / grid.clamp(min=1)[:, None].float()
    pos = bin_start[:, :, None] + in_bin[:, None, :]
    valid = (pos >= -1.0) & (pos <= size) & (sample_idx[None, None, :] < grid[:, None, None])
    pos = pos.clamp(min=0.0, max=float(size))
    low = pos.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    pos = torch.where(at_edge, low, pos)
    frac = pos - low
    w_high = torch.where(valid, frac, 0.0)
    w_low = torch.where(valid, 1.0 - frac, 0.0)
    low_i = low.long()
    high_i = torch.where(at_edge, low_i, low_i + 1)
    return low_i, high_i, w_low, w_high


def _backward_chunk(grad: Tensor, rois: Tensor, geometry: Sequence[Tensor], pooled: tuple[int, int],
                    height: int, width: int, out: Tensor) -> None:
    """Adds the feature gradient of one chunk of RoIs into ``out`` (B*H*W, C), float32. ``grad`` is laid out
    (K, out_w, out_h, C) so that one bmm contracts the x-bins of every channel."""
    start_y, bin_h, grid_h, start_x, bin_w, grid_w = geometry
    num, channels = grad.shape[0], grad.shape[3]
    ph, pw = pooled
    count = (grid_h * grid_w).clamp(min=1).float()
    y_low, y_high, wy_low, wy_high = _axis_samples(start_y, bin_h, grid_h, ph, height, max(int(grid_h.max()), 1))
    # x: each RoI's taps fall in a window of columns [x0, x0 + win), a bin's taps folded into it
    ax, x0, _ = _axis_weights(start_x, bin_w, grid_w, pw, width, 1)
    win = ax.shape[2]
    # rows[k, j, p, c] = sum_q ax[k, q, j] * grad[k, q, p, c]
    rows = torch.bmm(ax.transpose(1, 2), grad.view(num, pw, ph * channels)).view(-1, channels)

    # y: each (RoI, bin row, tap, window column) scatters one row of channels into the map
    taps = torch.stack([y_low, y_high], -1).view(num, ph, -1)
    weights = (torch.stack([wy_low, wy_high], -1) / count[:, None, None, None]).view(num, ph, -1)
    n_taps = taps.shape[2]
    col = torch.arange(win)
    pixel_x = (x0[:, None] + col).clamp(max=width - 1)  # columns past the map carry zero rows
    image = rois[:, 0].long() * (height * width)
    dst = image[:, None, None, None] + taps[..., None] * width + pixel_x[:, None, None, :]
    src = (torch.arange(num)[:, None, None, None] * win + col[None, None, None, :]) * ph \
        + torch.arange(ph)[None, :, None, None]
    src = src.expand(num, ph, n_taps, win)
    vals = weights[..., None].expand(num, ph, n_taps, win)
    matrix = torch.sparse_coo_tensor(torch.stack([dst.reshape(-1), src.reshape(-1)]), vals.reshape(-1),
                                     (out.shape[0], rows.shape[0]), check_invariants=False)
    out.addmm_(matrix, rows)


def _chunks(geometry: Sequence[Tensor], pooled: tuple[int, int], channels: int, height: int,
            width: int) -> list[Tensor]:
    """RoI index groups whose intermediates fit in ``_CHUNK_BYTES``; once past an eighth of that, a group holds one
    y-grid size and column windows within 25 % of each other (a chunk is padded to its largest RoI)."""
    _, _, grid_h, _, bin_w, _ = geometry
    ph, pw = pooled
    span_x = (bin_w * pw).clamp(min=0, max=width).ceil().long() + 2
    taps_y = 2 * grid_h.clamp(min=1, max=height)
    per_roi = ph * taps_y * span_x * 24 + span_x * ph * channels * 4 + ph * pw * channels * 8
    order = torch.argsort(grid_h * (4 * width + 8) + span_x, stable=True)
    keys = torch.stack([grid_h[order], span_x[order], per_roi[order]], 1).tolist()
    groups, start, used = [], 0, 0
    for i, (grid, span, cost) in enumerate(keys):
        padded = grid != keys[start][0] or 4 * span > 5 * keys[start][1]
        # a small chunk is not worth its fixed per-op overhead, even if mixing sizes pads it
        if i > start and (used + cost > _CHUNK_BYTES or (padded and used > _CHUNK_BYTES // 8)):
            groups.append(order[start:i])
            start, used = i, 0
        used += cost
    groups.append(order[start:])
    return groups


def roi_align_backward_cpu(grad: Tensor, rois: Tensor, spatial_scale: float, pooled: tuple[int, int],
                           feat_shape: Sequence[int], sampling_ratio: int, aligned: bool) -> Tensor:
    """Gradient w.r.t. the features of ``roi_align``, (B, C, H, W) float32, for CPU tensors."""
    batch, channels, height, width = feat_shape
    out = torch.zeros(batch * height * width, channels, dtype=torch.float32)
    if rois.shape[0] > 0 and out.numel() > 0:
        _accumulate(out, grad, rois, spatial_scale, pooled, sampling_ratio, aligned, height, width)
    return out.view(batch, height, width, channels).permute(0, 3, 1, 2)


def _accumulate(out: Tensor, grad: Tensor, rois: Tensor, spatial_scale: float, pooled: tuple[int, int],
                sampling_ratio: int, aligned: bool, height: int, width: int) -> None:
    rois = rois.float()
    batch = out.shape[0] // (height * width)
    lo, hi = int(rois[:, 0].min()), int(rois[:, 0].max())
    if lo < 0 or hi >= batch:  # the sparse product does not bounds-check its indices
        raise ValueError(f"roi_align backward: RoI batch index {lo if lo < 0 else hi} outside [0, {batch})")
    geometry = _roi_geometry(rois, spatial_scale, pooled, sampling_ratio, aligned)
    groups = _chunks(geometry, pooled, out.shape[1], height, width)
    grad_qpc = grad.permute(0, 3, 2, 1)
    for idx in groups:
        if len(groups) == 1:
            sub_grad, sub_rois, sub_geometry = grad_qpc, rois, geometry
        else:  # gathers and transposes in one pass
            sub_grad, sub_rois, sub_geometry = grad_qpc.index_select(0, idx), rois[idx], [g[idx] for g in geometry]
        _backward_chunk(sub_grad.float().contiguous(), sub_rois, sub_geometry, pooled, height, width, out)


# Windows of at most this many pixels are gathered and batched; larger ones run one RoI at a time on a view
# of the map (a per-RoI matmul beats copying a big window; for small ones the per-call overhead dominates).
# Measured in benchmarks/roi_align_speed.py.
_SMALL_WINDOW = 64
# Below this many channels torchvision's forward kernel is as fast or faster (its cost is per channel, ours
# has a per-RoI setup to amortise): 0.5-0.9x at 32-128 channels, 1.9-3.5x faster at 256 on FPN-level RoIs
# (benchmarks/roi_align_speed.py --channels). A pooled output (avg_pool > 1) is faster at any width.
_MIN_CHANNELS = 256


def _axis_weights(start: Tensor, bin_size: Tensor, grid: Tensor, bins: int, size: int,
                  pool: int) -> tuple[Tensor, Tensor, Tensor]:
    """One axis of the separable RoIAlign: (weights (K, bins // pool, win), first pixel (K,), span (K,)).
    ``weights[k, p, j]`` sums the bilinear weights that bin p of RoI k puts on pixel ``first[k] + j`` (not yet
    divided by the sample count); ``span`` is the number of pixels RoI k touches (``win`` the largest)."""
    low, high, w_low, w_high = _axis_samples(start, bin_size, grid, bins, size, max(int(grid.max()), 1))
    tapped = (w_low + w_high) > 0
    first = torch.where(tapped, low, size).amin(dim=(1, 2)).clamp(max=size - 1)
    rel_high = high - first[:, None, None]
    span = torch.where(tapped, rel_high, 0).amax(dim=(1, 2)) + 1
    win = int(span.max())
    # untapped samples (zero weight) may sit anywhere; keep their indices inside the window
    rel_low = (low - first[:, None, None]).clamp(min=0, max=win - 1)
    rel_high = rel_high.clamp(min=0, max=win - 1)
    num = start.shape[0]
    weights = start.new_zeros(num, bins, win)
    weights.scatter_add_(2, rel_low.view(num, bins, -1), w_low.view(num, bins, -1))
    weights.scatter_add_(2, rel_high.view(num, bins, -1), w_high.view(num, bins, -1))
    if pool > 1:
        weights = weights.view(num, bins // pool, pool, win).mean(2)
    return weights, first, span


def _small_window_groups(span_y: Tensor, span_x: Tensor, small: Tensor, channels: int) -> list[Tensor]:
    """Index groups of the small-window RoIs, sorted by window so that padding to a group's largest stays
    within ~25 %, each gathering at most ``_CHUNK_BYTES``."""
    num_small = int(small.sum())
    if num_small == 0:
        return []
    key = torch.where(small, span_y * (int(span_x.max()) + 1) + span_x, -1)
    order = torch.argsort(key, stable=True)[len(key) - num_small:]
    sy, sx = span_y[order].tolist(), span_x[order].tolist()
    groups, start, max_y, max_x = [], 0, 0, 0
    for i in range(num_small):
        new_y, new_x = max(max_y, sy[i]), max(max_x, sx[i])
        too_big = (i - start + 1) * new_y * new_x * channels * 4 > _CHUNK_BYTES
        too_padded = new_y * new_x > 1.25 * sy[start] * sx[start] + 16
        if i > start and (too_big or too_padded):
            groups.append(order[start:i])
            start, new_y, new_x = i, sy[i], sx[i]
        max_y, max_x = new_y, new_x
    groups.append(order[start:])
    return groups


def roi_align_forward_cpu(feat: Tensor, rois: Tensor, spatial_scale: float, pooled: tuple[int, int],
                          sampling_ratio: int, aligned: bool, avg_pool: int = 1) -> Tensor:
    """``roi_align`` of float32 CPU features, (K, C, out_h // avg_pool, out_w // avg_pool) float32."""
    batch, channels, height, width = feat.shape
    ph, pw = pooled
    num = rois.shape[0]
    out = feat.new_empty(num, channels, ph // avg_pool, pw // avg_pool)
    if num == 0 or channels == 0:
        return out
    if height == 0 or width == 0:
        return out.zero_()
    rois = rois.float()
    lo, hi = int(rois[:, 0].min()), int(rois[:, 0].max())
    if lo < 0 or hi >= batch:
        raise ValueError(f"roi_align: RoI batch index {lo if lo < 0 else hi} outside [0, {batch})")
    start_y, bin_h, grid_h, start_x, bin_w, grid_w = _roi_geometry(rois, spatial_scale, pooled, sampling_ratio,
                                                                   aligned)
    count = (grid_h * grid_w).clamp(min=1).float()
    a_y, y0, span_y = _axis_weights(start_y, bin_h, grid_h, ph, height, avg_pool)
    a_x, x0, span_x = _axis_weights(start_x, bin_w, grid_w, pw, width, avg_pool)
    a_y = a_y / count[:, None, None]
    a_xt = a_x.transpose(1, 2)
    ph, pw = ph // avg_pool, pw // avg_pool
    image = rois[:, 0].long()
    small = span_y * span_x <= _SMALL_WINDOW
    groups = _small_window_groups(span_y, span_x, small, channels)
    if groups:
        rows_of_channels = feat.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    for idx in groups:
        n, wy, wx = len(idx), int(span_y[idx].max()), int(span_x[idx].max())
        rows = (y0[idx, None] + torch.arange(wy)).clamp(max=height - 1)
        cols = (x0[idx, None] + torch.arange(wx)).clamp(max=width - 1)
        pixels = (image[idx, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
        window = rows_of_channels.index_select(0, pixels.view(-1)).view(n, wy, wx, channels)
        # x first: (n, wy, C, wx) @ (n, 1, wx, pw); then y: (n, ph, wy) @ (n, wy, C * pw)
        by_x = torch.matmul(window.transpose(2, 3), a_xt[idx, :wx, None].transpose(1, 2).expand(n, wy, wx, pw))
        by_xy = torch.bmm(a_y[idx, :, :wy], by_x.reshape(n, wy, channels * pw)).view(n, ph, channels, pw)
        out.index_copy_(0, idx, by_xy.permute(0, 2, 1, 3))
    large = (~small).nonzero().squeeze(1).tolist()
    if large:
        image_l, y0_l, x0_l, sy_l, sx_l = image.tolist(), y0.tolist(), x0.tolist(), span_y.tolist(), span_x.tolist()
        for k in large:
            wy, wx = sy_l[k], sx_l[k]
            window = feat[image_l[k], :, y0_l[k]:y0_l[k] + wy, x0_l[k]:x0_l[k] + wx]   # a view: (C, wy, wx)
            torch.matmul(torch.matmul(a_y[k, :, :wy], window), a_xt[k, :wx], out=out[k])
    return out


def _vectorised(feat: Tensor, avg_pool: int) -> bool:
    if exporting() or feat.device.type != "cpu" or feat.dtype not in (torch.float32, torch.bfloat16):
        return False
    return feat.shape[1] >= _MIN_CHANNELS or avg_pool > 1


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool, avg_pool: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (output_size, spatial_scale, sampling_ratio, aligned, tuple(feat.shape), feat.dtype, avg_pool)
        # bf16: torchvision has no bf16 CPU kernel; like its autocast wrapper, pool in float32 and cast back,
        # in float32 even under autocast, which would otherwise run the weight products in bf16
        with torch.autocast("cpu", enabled=False):
            out = roi_align_forward_cpu(feat.float(), rois, spatial_scale, output_size, sampling_ratio, aligned,
                                        avg_pool)
        return out.to(feat.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (rois,) = ctx.saved_tensors
        output_size, spatial_scale, sampling_ratio, aligned, shape, dtype, avg_pool = ctx.args
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        if avg_pool > 1:
            # each pooled bin averages avg_pool**2 RoIAlign bins: they share its gradient equally
            grad_out = grad_out.repeat_interleave(avg_pool, 2).repeat_interleave(avg_pool, 3) / avg_pool**2
        grad_feat = roi_align_backward_cpu(grad_out, rois, spatial_scale, output_size, shape, sampling_ratio,
                                           aligned)
        return grad_feat.to(dtype).contiguous(), None, None, None, None, None, None


def roi_align(feat: Tensor, rois: Tensor, output_size: int | Sequence[int], spatial_scale: float,
              sampling_ratio: int = 0, aligned: bool = True, avg_pool: int = 1) -> Tensor:
    """``MultiLevelRoIAlign``'s kernel (``torchvision.ops.roi_align``, then ``avg_pool``), vectorised on CPU.

    ``feat`` (B, C, H, W); ``rois`` (K, 5) rows of (batch index, x1, y1, x2, y2) in input pixels, same dtype
    as ``feat`` (bf16 features are pooled in float32 and cast back). ``avg_pool`` > 1 returns the (out_h,
    out_w) RoIAlign average-pooled by that factor (which must divide both), i.e. (K, C, out_h / avg_pool,
    out_w / avg_pool), without building the full-size result. No gradient flows to ``rois``, as in
    torchvision. Elsewhere (CUDA, other dtypes, exporting, narrow features) it is torchvision's kernel."""
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align: rois must be (K, 5), got {tuple(rois.shape)}")
    if feat.dim() != 4:
        raise ValueError(f"roi_align: feat must be (B, C, H, W), got {tuple(feat.shape)}")
    size = _pair(output_size)
    avg_pool = int(avg_pool)
    if avg_pool < 1 or size[0] % avg_pool or size[1] % avg_pool:
        raise ValueError(f"roi_align: avg_pool {avg_pool} must be >= 1 and divide output_size {size}")
    if not _vectorised(feat, avg_pool):
        return torchvision_roi_align(feat, rois, size, spatial_scale, sampling_ratio, aligned, avg_pool)
    return _RoIAlign.apply(feat, rois, size, float(spatial_scale), int(sampling_ratio), bool(aligned), avg_pool)


def use_vectorised_roi_align(model: nn.Module) -> int:
    """Makes every ``MultiLevelRoIAlign`` in ``model`` pool with ``roi_align`` above; returns how many."""
    extractors = [m for m in model.modules() if isinstance(m, MultiLevelRoIAlign)]
    for extractor in extractors:
        extractor.kernel = roi_align
    return len(extractors)


class VectorisedCPURoIAlign(Callback):
    """``use_vectorised_roi_align`` on the LightningModule before fit / validate / test / predict."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if use_vectorised_roi_align(pl_module) == 0:
            raise ValueError("VectorisedCPURoIAlign: the model has no MultiLevelRoIAlign to speed up; remove the "
                             "callback from trainer.callbacks")
