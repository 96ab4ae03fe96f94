"""Deformable convolution that runs in float32 under mixed precision, on any device.

torchvision's CPU kernel has no half (or bfloat16) version, and its CUDA autocast rule covers CUDA only,
so ``16-mixed`` training (V100s have no bf16) would fail in GA-RPN's feature adaption or a DCN backbone
on CPU and differ between devices. mmcv runs deformable convolution in fp32 under fp16 training; so do we:
the inputs are cast to float32 with autocast switched off, and the output is cast back to the dtype the
neighbouring convolutions produce (autocast's dtype, or the input's outside autocast).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision import ops


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                  stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                  dilation: int | tuple[int, int] = 1, mask: Tensor | None = None) -> Tensor:
    """``torchvision.ops.deform_conv2d`` computed in float32 (same arguments)."""
    device_type = input.device.type
    autocast = torch.is_autocast_enabled(device_type)
    out_dtype = torch.get_autocast_dtype(device_type) if autocast else input.dtype
    tensors = [t for t in (input, offset, weight, bias, mask) if t is not None]
    if not autocast and all(t.dtype == torch.float32 for t in tensors):
        return ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)

    def fp32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float()

    with torch.autocast(device_type, enabled=False):
        out = ops.deform_conv2d(fp32(input), fp32(offset), fp32(weight), fp32(bias), stride, padding, dilation,
                                fp32(mask))
    return out.to(out_dtype)


class Float32DeformConv2d(ops.DeformConv2d):
    """``torchvision.ops.DeformConv2d`` (same parameters and state-dict keys, offsets given by the caller, as in
    GA-RPN's feature adaption) through :func:`deform_conv2d`. Not to be confused with the backbone's
    ``DeformConv2dPack``, which computes its own offsets."""

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)
