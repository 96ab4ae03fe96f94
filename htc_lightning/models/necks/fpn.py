"""Feature Pyramid Network with mmdetection's semantics (``FPN`` with ``num_outs=5``, no extra convs)."""
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Lateral 1×1 convs, top-down nearest up-sampling *to the lower level's size* (so odd sizes work),
    3×3 output convs; levels beyond the inputs by max-pool(kernel 1, stride 2) of the last output
    (P6 in Mask R-CNN / HTC).

    Args:
        in_channels: channels of the backbone features, finest first. Leave it out (``None``) and the
            :class:`~htc_lightning.models.detector.Detector` binds it to ``backbone.out_channels``, so a
            config swapping the backbone never repeats its widths.
        out_channels: width of every pyramid level.
        num_outs: number of outputs (≥ number of inputs).
        in_strides: strides of the inputs (bound to ``backbone.strides`` likewise); sets :attr:`strides`.
    """

    def __init__(self, in_channels: Sequence[int] | None = None, out_channels: int = 256,
                 num_outs: int = 5, in_strides: Sequence[int] | None = None) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.in_channels: list[int] = []
        self.strides: list[int] = []
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        if in_channels is not None:
            self.bind(in_channels, in_strides or [4 * 2**i for i in range(len(in_channels))])

    def bind(self, in_channels: Sequence[int], in_strides: Sequence[int]) -> None:
        """Build the lateral and output convs for these inputs (once; a second call must agree)."""
        in_channels, in_strides = [int(c) for c in in_channels], [int(s) for s in in_strides]
        if self.in_channels:
            if self.in_channels != in_channels:
                raise ValueError(f"FPN built for in_channels={self.in_channels}, but the backbone gives {in_channels}")
            return
        if self.num_outs < len(in_channels):
            raise ValueError(f"num_outs={self.num_outs} is smaller than the {len(in_channels)} input levels")
        self.in_channels = in_channels
        self.lateral_convs.extend(nn.Conv2d(c, self.out_channels, 1) for c in in_channels)
        self.fpn_convs.extend(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) for _ in in_channels)
        last = in_strides[len(in_channels) - 1]
        self.strides = in_strides[: len(in_channels)] + [last * 2 ** (i + 1)
                                                         for i in range(self.num_outs - len(in_channels))]
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
