"""Delta (dx, dy, dw, dh) box coding as mmdet's ``DeltaXYWHBBoxCoder``."""
import math
from collections.abc import Sequence

from torch import Tensor


class BoxCoder:
    """``encode(boxes, gt) -> deltas`` and ``decode(boxes, deltas, max_shape) -> boxes``, both (N, 4) xyxy.

    Widths are ``x2 - x1`` (no +1, mmdet 2.x/3.x). ``decode`` clamps |dw|, |dh| to ``log(1000/16)``
    (``wh_ratio_clip``) and, given ``max_shape=(h, w)``, clips to the image like mmdet's ``clip_border``.
    Works on any leading shape (..., 4).
    """

    def __init__(self, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 wh_ratio_clip: float = 16 / 1000, clip_border: bool = True) -> None:
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))
        self.clip_border = clip_border

    def encode(self, boxes: Tensor, gt: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        raise NotImplementedError
