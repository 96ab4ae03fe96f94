"""Feature Pyramid Network with mmdetection's semantics (``FPN`` with ``num_outs=5``, no extra convs)."""
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import FeatureSpec


class FPN(nn.Module):
    """Lateral 1×1 convs, top-down nearest up-sampling *to the lower level's size* (so odd sizes work),
    3×3 output convs; levels beyond the inputs by max-pool(kernel 1, stride 2) of the last output
    (P6 in Mask R-CNN / HTC).

    Args:
        input: the backbone's widths and strides (the Detector passes them; a config never repeats them).
        out_channels: width of every pyramid level.
        num_outs: number of outputs (≥ number of inputs); :attr:`strides` are the inputs' and then doubling.
    """

    def __init__(self, input: FeatureSpec, out_channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        in_channels, in_strides = input.channels, input.strides
        if num_outs < len(in_channels):
            raise ValueError(f"FPN: num_outs={num_outs} is smaller than the {len(in_channels)} input levels")
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.in_channels = list(in_channels)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.strides = list(in_strides) + [in_strides[-1] * 2 ** (i + 1) for i in range(num_outs - len(in_strides))]
        self._init_weights()

    def _init_weights(self) -> None:
        # mmdet's ConvModule default: xavier-uniform weights, zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"FPN built for {len(self.lateral_convs)} inputs, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
