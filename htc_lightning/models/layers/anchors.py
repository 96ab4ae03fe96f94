"""Anchor grids with mmdetection's layout (ratio-major base anchors, no rounding,
centres at ``i * stride``, location-major flattening: index = (y * W + x) * A + a)."""
from collections.abc import Sequence

import torch
from torch import Tensor


class AnchorGenerator:
    """mmdet ``AnchorGenerator``. Either ``scales`` or (``octave_base_scale``, ``scales_per_octave``).

    ``base_sizes`` default to the strides; ``center_offset`` 0 puts centres at ``i * stride``.
    """

    def __init__(self, strides: Sequence[int], ratios: Sequence[float], scales: Sequence[float] | None = None,
                 octave_base_scale: float | None = None, scales_per_octave: int | None = None,
                 base_sizes: Sequence[int] | None = None, center_offset: float = 0.0) -> None:
        raise NotImplementedError

    @property
    def num_base_anchors(self) -> int:
        """Anchors per location (same on every level)."""
        raise NotImplementedError

    def base_anchors(self, level: int) -> Tensor:
        """(A, 4) anchors centred at the origin of ``level`` (mmdet's ``base_anchors``)."""
        raise NotImplementedError

    def grid_anchors(self, featmap_sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> list[Tensor]:
        """One (H*W*A, 4) tensor per level; cached per (sizes, device)."""
        raise NotImplementedError

    def valid_flags(self, featmap_sizes: Sequence[tuple[int, int]], img_size: tuple[int, int],
                    device: torch.device | str = "cpu") -> list[Tensor]:
        """One (H*W*A,) bool tensor per level: True where the anchor's location lies in the
        un-padded image (mmdet: ``valid = ceil(img / stride)`` rows/cols, clipped to the feature size)."""
        raise NotImplementedError
