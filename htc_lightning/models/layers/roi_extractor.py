"""RoIAlign over an FPN pyramid (mmdet's ``SingleRoIExtractor``)."""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from htc_lightning.models.layers.tracing import exporting, known_empty


def roi_align(feat: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int = 0, aligned: bool = True, avg_pool: int = 1) -> Tensor:
    """``torchvision.ops.roi_align``, average-pooled by ``avg_pool``: (K, C, S / avg_pool, S / avg_pool).
    With ``aligned=True`` it is mmcv's ``RoIAlign(pool_mode="avg", aligned=True)``: the same half-pixel
    offset, adaptive grid (``ceil(roi / bins)`` samples per bin for ``sampling_ratio=0``) and out-of-map rule."""
    out = torchvision.ops.roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return F.avg_pool2d(out, avg_pool) if avg_pool > 1 else out


class MultiLevelRoIAlign(nn.Module):
    """Each RoI is pooled from one level: ``floor(log2(sqrt(w*h) / finest_scale + 1e-6))`` clamped to the
    levels (w = x2 - x1), with ``kernel`` (``roi_align`` above: torchvision's, ``aligned=True``,
    ``sampling_ratio=0``; ``htc_lightning.accel.roi_align_cpu`` swaps in a vectorised CPU one).
    With one stride it is a plain single-level RoIAlign (the semantic feature at stride 8)."""

    def __init__(self, output_size: int, featmap_strides: Sequence[int], sampling_ratio: int = 0,
                 finest_scale: int = 56, aligned: bool = True) -> None:
        super().__init__()
        if len(featmap_strides) == 0:
            raise ValueError("MultiLevelRoIAlign: featmap_strides is empty")
        self.output_size = int(output_size)
        self.featmap_strides = [int(s) for s in featmap_strides]
        self.sampling_ratio = int(sampling_ratio)
        self.finest_scale = finest_scale
        self.aligned = aligned
        self.kernel = roi_align

    @property
    def num_inputs(self) -> int:
        return len(self.featmap_strides)

    def map_roi_levels(self, rois: Tensor, num_levels: int) -> Tensor:
        # FPN paper eq. (1) in mmdet's form: level 0 below 112 px (2 * finest_scale), one level per octave.
        rois = rois.float()  # sqrt/log2 in fp16 would move boxes near a level boundary
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=num_levels - 1).long()

    def forward(self, feats: Sequence[Tensor], rois: Tensor, avg_pool: int = 1) -> Tensor:
        """``rois`` (K, 5): batch index, x1, y1, x2, y2 in input pixels. Uses the first
        ``len(featmap_strides)`` of ``feats``. Returns (K, C, S, S), or with ``avg_pool`` the (S, S) RoIAlign
        average-pooled by that factor, (K, C, S / avg_pool, S / avg_pool)."""
        num_levels = self.num_inputs
        if len(feats) < num_levels:
            raise ValueError(f"MultiLevelRoIAlign: {len(feats)} feature maps for {num_levels} strides "
                             f"{self.featmap_strides}")
        feats = feats[:num_levels]
        size = (self.output_size, self.output_size)
        dtype = feats[0].dtype
        rois_t = rois.to(dtype)
        if num_levels == 1:
            if known_empty(rois.shape[0]):
                out_size = (self.output_size // avg_pool,) * 2
                return feats[0].new_zeros(0, feats[0].shape[1], *out_size) + feats[0].sum() * 0
            return self.kernel(feats[0], rois_t, size, 1.0 / self.featmap_strides[0], self.sampling_ratio,
                             self.aligned, avg_pool)
        levels = self.map_roi_levels(rois, num_levels)
        if exporting():
            return self._traced_levels(feats, rois_t, levels, avg_pool)
        # RoIs grouped by level with one host transfer of the group sizes (a mask and nonzero per level would
        # wait for the device once per level); stable, so each level keeps its RoIs in input order
        order = torch.argsort(levels, stable=True)
        counts = torch.zeros(num_levels, dtype=torch.long, device=levels.device).scatter_add_(
            0, levels, torch.ones_like(levels)).tolist()
        # every RoI gets exactly one level, so every row is written below
        out = feats[0].new_empty(rois.shape[0], feats[0].shape[1], self.output_size // avg_pool,
                                 self.output_size // avg_pool)
        unused = None
        start = 0
        for feat, stride, count in zip(feats, self.featmap_strides, counts):
            if count == 0:
                if torch.is_grad_enabled() and feat.requires_grad:
                    # keep every level in the graph so DDP sees the same parameters used on every rank
                    unused = feat.sum() * 0 if unused is None else unused + feat.sum() * 0
                continue
            inds = order[start:start + count]
            start += count
            out.index_copy_(0, inds, self.kernel(feat, rois_t.index_select(0, inds), size, 1.0 / stride,
                                               self.sampling_ratio, self.aligned, avg_pool))
        if unused is not None:
            if out.shape[0] == 0:
                return out + unused
            out[:1] = out[:1] + unused  # a one-row op, not a copy of the whole output
        return out

    def _traced_levels(self, feats: Sequence[Tensor], rois: Tensor, levels: Tensor, avg_pool: int) -> Tensor:
        """``forward``'s per-level pooling in a graph, where the group sizes are known only when it runs: each
        level's RoIs by a nonzero (index order, as the stable sort's groups), written to their rows."""
        size = self.output_size // avg_pool
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], size, size)
        for level, (feat, stride) in enumerate(zip(feats, self.featmap_strides)):
            inds = (levels == level).nonzero().squeeze(1)
            pooled = roi_align(feat, rois.index_select(0, inds), (self.output_size, self.output_size), 1.0 / stride,
                               self.sampling_ratio, self.aligned, avg_pool)
            out = out.index_copy(0, inds, pooled)
        return out
