"""Anchor grids with mmdetection's layout (ratio-major base anchors, no rounding,
centres at ``i * stride``, location-major flattening: index = (y * W + x) * A + a).

The GA-RPN's two generators are plain instances: approx anchors
``AnchorGenerator(strides, ratios=[0.5, 1, 2], octave_base_scale=8, scales_per_octave=3)`` (9 per location)
and square anchors ``AnchorGenerator(strides, ratios=[1.0], scales=[8])`` (1 per location).
"""
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from .tracing import exporting

# Multi-scale training changes the feature sizes every batch; keep only the recent grids.
_CACHE_SIZE = 16


class AnchorGenerator:
    """mmdet ``AnchorGenerator``. Either ``scales`` or (``octave_base_scale``, ``scales_per_octave``).

    ``base_sizes`` default to the strides; ``center_offset`` 0 puts centres at ``i * stride``.
    """

    def __init__(self, strides: Sequence[int], ratios: Sequence[float], scales: Sequence[float] | None = None,
                 octave_base_scale: float | None = None, scales_per_octave: int | None = None,
                 base_sizes: Sequence[int] | None = None, center_offset: float = 0.0) -> None:
        octave = octave_base_scale is not None and scales_per_octave is not None
        if octave == (scales is not None):
            raise ValueError("AnchorGenerator: give either `scales` or both `octave_base_scale` and "
                             f"`scales_per_octave` (got scales={scales}, octave_base_scale={octave_base_scale}, "
                             f"scales_per_octave={scales_per_octave})")
        if not 0.0 <= center_offset <= 1.0:
            raise ValueError(f"AnchorGenerator: center_offset must lie in [0, 1], got {center_offset}")
        self.strides = [int(s) for s in strides]
        self.base_sizes = list(self.strides) if base_sizes is None else list(base_sizes)
        if len(self.base_sizes) != len(self.strides):
            raise ValueError(f"AnchorGenerator: {len(self.base_sizes)} base_sizes for {len(self.strides)} strides")
        if scales is None:
            # mmdet computes the octave scales in float64 (numpy) before the float32 cast.
            scales = [2 ** (i / scales_per_octave) * octave_base_scale for i in range(scales_per_octave)]
        self.scales = torch.tensor([float(s) for s in scales], dtype=torch.float32)
        self.ratios = torch.tensor([float(r) for r in ratios], dtype=torch.float32)
        self.octave_base_scale = octave_base_scale
        self.scales_per_octave = scales_per_octave
        self.center_offset = float(center_offset)
        self._base = [self._level_base_anchors(size) for size in self.base_sizes]
        self._cache: OrderedDict[tuple, list[Tensor]] = OrderedDict()

    def _level_base_anchors(self, base_size: float) -> Tensor:
        # Ratio-major (mmdet's scale_major=True): index = ratio_idx * num_scales + scale_idx.
        # The product order (size * ratio) * scale is mmdet's, which fixes the float32 rounding.
        cx = self.center_offset * base_size
        cy = self.center_offset * base_size
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        ws = (base_size * w_ratios[:, None] * self.scales[None, :]).reshape(-1)
        hs = (base_size * h_ratios[:, None] * self.scales[None, :]).reshape(-1)
        return torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=-1)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per location (same on every level)."""
        return int(self.ratios.numel() * self.scales.numel())

    def base_anchors(self, level: int) -> Tensor:
        """(A, 4) anchors centred at the origin of ``level`` (mmdet's ``base_anchors``)."""
        return self._base[level].clone()

    def _check_levels(self, featmap_sizes: Sequence[tuple[int, int]]) -> None:
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"AnchorGenerator: {len(featmap_sizes)} feature maps for {self.num_levels} strides "
                             f"{self.strides}")

    def single_level_grid_anchors(self, featmap_size: tuple[int, int], level: int,
                                  device: torch.device | str = "cpu") -> Tensor:
        """(H*W*A, 4) anchors of one level (not cached)."""
        # a traced feature size stays symbolic: int() would freeze the example image's size into the graph
        feat_h, feat_w = featmap_size if exporting() else (int(featmap_size[0]), int(featmap_size[1]))
        stride = self.strides[level]
        base = self._base[level].to(device)
        shift_x = torch.arange(feat_w, device=device).to(torch.float32) * stride
        shift_y = torch.arange(feat_h, device=device).to(torch.float32) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4)

    def grid_anchors(self, featmap_sizes: Sequence[tuple[int, int]],
                     device: torch.device | str = "cpu") -> list[Tensor]:
        """One (H*W*A, 4) tensor per level; cached per (sizes, device). Do not modify the result in place."""
        self._check_levels(featmap_sizes)
        if exporting():  # the graph computes the grids (a cache key would freeze the traced sizes)
            return [self.single_level_grid_anchors(size, i, device) for i, size in enumerate(featmap_sizes)]
        key = (tuple((int(h), int(w)) for h, w in featmap_sizes), str(torch.device(device)))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return list(hit)
        anchors = [self.single_level_grid_anchors(size, i, device) for i, size in enumerate(featmap_sizes)]
        self._cache[key] = anchors
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return list(anchors)

    def valid_flags(self, featmap_sizes: Sequence[tuple[int, int]], img_size: tuple[int, int],
                    device: torch.device | str = "cpu") -> list[Tensor]:
        """One (H*W*A,) bool tensor per level: True where the anchor's location lies in the
        un-padded image (mmdet: ``valid = ceil(img / stride)`` rows/cols, clipped to the feature size)."""
        self._check_levels(featmap_sizes)
        h, w = int(img_size[0]), int(img_size[1])
        flags = []
        for stride, (feat_h, feat_w) in zip(self.strides, featmap_sizes):
            valid_h = min(math.ceil(h / stride), feat_h)
            valid_w = min(math.ceil(w / stride), feat_w)
            valid_y = torch.arange(feat_h, device=device) < valid_h
            valid_x = torch.arange(feat_w, device=device) < valid_w
            valid = (valid_y[:, None] & valid_x[None, :]).reshape(-1)
            flags.append(valid[:, None].expand(-1, self.num_base_anchors).reshape(-1))
        return flags

    def inside_flags(self, featmap_sizes: Sequence[tuple[int, int]], pad_size: tuple[int, int],
                     img_size: tuple[int, int], allowed_border: int = 0,
                     device: torch.device | str = "cpu") -> Tensor:
        """(sum H*W*A,) bool over all levels: ``valid_flags`` against ``pad_size`` and ``anchor_inside_flags``
        against ``img_size``; cached like the grids (a batch of one size recomputes nothing). Do not modify
        the result in place."""
        key = ("inside", tuple((int(h), int(w)) for h, w in featmap_sizes), tuple(int(v) for v in pad_size),
               tuple(int(v) for v in img_size), int(allowed_border), str(torch.device(device)))
        hit = self._cache.get(key)
        if hit is None:
            anchors = torch.cat(self.grid_anchors(featmap_sizes, device))
            valid = torch.cat(self.valid_flags(featmap_sizes, pad_size, device))
            hit = anchor_inside_flags(anchors, valid, img_size, allowed_border)
            self._cache[key] = hit
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return hit

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(strides={self.strides}, ratios={self.ratios.tolist()}, "
                f"scales={self.scales.tolist()}, base_sizes={self.base_sizes}, center_offset={self.center_offset})")


def anchor_inside_flags(anchors: Tensor, valid_flags: Tensor, img_size: tuple[int, int],
                        allowed_border: int = 0) -> Tensor:
    """mmdet's ``anchor_inside_flags``: ``valid_flags`` and, when ``allowed_border >= 0``, the anchor lies
    within the image grown by ``allowed_border`` (x2 < w + border, strict). ``allowed_border < 0`` keeps all
    valid anchors (the RPN/GA-RPN configs use -1)."""
    if allowed_border < 0:
        return valid_flags
    img_h, img_w = img_size[0], img_size[1]
    return (valid_flags
            & (anchors[:, 0] >= -allowed_border) & (anchors[:, 1] >= -allowed_border)
            & (anchors[:, 2] < img_w + allowed_border) & (anchors[:, 3] < img_h + allowed_border))
