"""RoIAlign over an FPN pyramid (mmdet's ``SingleRoIExtractor``)."""
from collections.abc import Sequence

from torch import Tensor, nn


class MultiLevelRoIAlign(nn.Module):
    """Each RoI is pooled from one level: ``floor(log2(sqrt(w*h) / finest_scale + 1e-6))`` clamped to the
    levels (w = x2 - x1). torchvision ``roi_align`` with ``aligned=True``, ``sampling_ratio=0``.
    With one stride it is a plain single-level RoIAlign (the semantic feature at stride 8)."""

    def __init__(self, output_size: int, featmap_strides: Sequence[int], sampling_ratio: int = 0,
                 finest_scale: int = 56, aligned: bool = True) -> None:
        super().__init__()
        raise NotImplementedError

    def map_roi_levels(self, rois: Tensor, num_levels: int) -> Tensor:
        raise NotImplementedError

    def forward(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        """``rois`` (K, 5): batch index, x1, y1, x2, y2 in input pixels. Uses the first
        ``len(featmap_strides)`` of ``feats``. Returns (K, C, S, S)."""
        raise NotImplementedError
