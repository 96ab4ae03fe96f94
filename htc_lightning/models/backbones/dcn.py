"""Deformable convolution with its own offset branch (Dai et al., ICCV 2017), laid out like mmcv's
``DeformConv2dPack`` so that mmdet's ``dconv_c3-c5`` checkpoints load key for key:
``<name>.weight`` (no bias) and ``<name>.conv_offset.weight`` / ``<name>.conv_offset.bias``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.deform_conv import deform_conv2d  # float32 under autocast


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class DeformConv2dPack(nn.Module):
    """A k×k deformable convolution whose sampling offsets come from a plain convolution of the input (mmcv's
    name: the offset convolution is packed inside; GA-RPN's ``Float32DeformConv2d`` is given its offsets).

    The offset convolution starts at zero (weights and bias), so a freshly built layer computes exactly the
    regular convolution with the same weight; mmdet initialises it the same way and ImageNet checkpoints,
    which have no offsets, therefore keep their meaning.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 1,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, deform_groups: int = 1) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConv2dPack: channels {in_channels}->{out_channels} "
                             f"not divisible by groups={groups}")
        if in_channels % deform_groups:
            raise ValueError(f"DeformConv2dPack: in_channels={in_channels} "
                             f"not divisible by deform_groups={deform_groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deform_groups = groups, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        kh, kw = self.kernel_size
        # one (dy, dx) pair per kernel tap and deformable group: torchvision's and mmcv's offset layout
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * 2 * kh * kw, self.kernel_size,
                                     stride=self.stride, padding=self.padding, dilation=self.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, deform_groups: int = 1) -> DeformConv2dPack:
        """A deformable twin of ``conv`` (same geometry, same weight, zero offsets)."""
        if conv.bias is not None:
            raise ValueError("DeformConv2dPack.from_conv: a conv with a bias is not supported (ResNet's 3x3 has none)")
        if not isinstance(conv.padding, tuple):
            raise ValueError(f"DeformConv2dPack.from_conv: padding mode {conv.padding!r} is not supported")
        dcn = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, deform_groups)
        with torch.no_grad():
            dcn.weight.copy_(conv.weight)
        return dcn.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        offset = self.conv_offset(x)
        return deform_conv2d(x, offset, self.weight, None, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}")
