"""Delta (dx, dy, dw, dh) box coding as mmdet's ``DeltaXYWHBBoxCoder``."""
import math
from collections.abc import Sequence

import torch
from torch import Tensor


class BoxCoder:
    """``encode(boxes, gt) -> deltas`` and ``decode(boxes, deltas, max_shape) -> boxes``, both (N, 4) xyxy.

    Widths are ``x2 - x1`` (no +1, mmdet 2.x/3.x). ``decode`` clamps |dw|, |dh| to ``log(1000/16)``
    (``wh_ratio_clip``) and, given ``max_shape=(h, w)``, clips to the image like mmdet's ``clip_border``.
    Works on any leading shape (..., 4). ``decode`` also accepts per-class deltas (..., K * 4) for
    boxes (..., 4), like mmdet's ``delta2bbox``, and returns (..., K * 4).
    """

    def __init__(self, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 wh_ratio_clip: float = 16 / 1000, clip_border: bool = True) -> None:
        if len(means) != 4 or len(stds) != 4:
            raise ValueError(f"BoxCoder: means and stds need 4 values each, got means={means}, stds={stds}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))
        self.clip_border = clip_border

    def encode(self, boxes: Tensor, gt: Tensor) -> Tensor:
        if boxes.shape != gt.shape or boxes.shape[-1] != 4:
            raise ValueError(f"BoxCoder.encode: boxes {tuple(boxes.shape)} and gt {tuple(gt.shape)} "
                             "must both be (..., 4)")
        # mmdet encodes in float32 whatever the input precision (targets under AMP stay fp32).
        boxes, gt = boxes.float(), gt.float()
        px = (boxes[..., 0] + boxes[..., 2]) * 0.5
        py = (boxes[..., 1] + boxes[..., 3]) * 0.5
        pw = boxes[..., 2] - boxes[..., 0]
        ph = boxes[..., 3] - boxes[..., 1]
        gx = (gt[..., 0] + gt[..., 2]) * 0.5
        gy = (gt[..., 1] + gt[..., 3]) * 0.5
        gw = gt[..., 2] - gt[..., 0]
        gh = gt[..., 3] - gt[..., 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape: tuple[int, int] | Tensor | None = None) -> Tensor:
        if boxes.shape[-1] != 4 or deltas.shape[-1] % 4 != 0 or deltas.shape[:-1] != boxes.shape[:-1]:
            raise ValueError(f"BoxCoder.decode: boxes {tuple(boxes.shape)} must be (..., 4) and deltas "
                             f"{tuple(deltas.shape)} (..., K * 4) with the same leading shape")
        out_shape = deltas.shape
        num_per_box = deltas.shape[-1] // 4
        deltas = deltas.reshape(*deltas.shape[:-1], num_per_box, 4)
        boxes = boxes.to(deltas.dtype)[..., None, :]
        denorm = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
        pwh = boxes[..., 2:] - boxes[..., :2]
        dwh = denorm[..., 2:].clamp(min=-self.max_ratio, max=self.max_ratio)
        gxy = pxy + pwh * denorm[..., :2]
        gwh = pwh * dwh.exp()
        out = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if self.clip_border and max_shape is not None:
            if isinstance(max_shape, Tensor):
                # one (h, w) per box, (N, 2): boxes of several images decoded at once; clamp(0, m) is
                # min(max(x, 0), m), the same arithmetic as with a number
                h, w = max_shape[:, None, 0].to(out.dtype), max_shape[:, None, 1].to(out.dtype)
                out = torch.stack([torch.minimum(out[..., 0].clamp(min=0), w),
                                   torch.minimum(out[..., 1].clamp(min=0), h),
                                   torch.minimum(out[..., 2].clamp(min=0), w),
                                   torch.minimum(out[..., 3].clamp(min=0), h)], dim=-1)
            else:
                h, w = max_shape[0], max_shape[1]
                out = torch.stack([out[..., 0].clamp(0, w), out[..., 1].clamp(0, h),
                                   out[..., 2].clamp(0, w), out[..., 3].clamp(0, h)], dim=-1)
        return out.reshape(out_shape)
