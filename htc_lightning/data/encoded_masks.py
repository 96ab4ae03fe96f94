"""Instance masks kept as COCO RLEs until the training transform knows their output size.

A 12000x9000 photo's masks decoded at full size cost 108 MB per object before being resized to ~1333x800.
:meth:`EncodedMasks.resize` gives exactly what nearest-resizing the decoded masks gives (same source pixel for
every output pixel, taken from torchvision's own kernel) while reading only the output's pixels from each
run-length encoding, so its cost follows the output size, not the photo's. Images that are not shrunk take
the plain path (decode, then resize): the numbers of COCO-size images are unchanged by construction.
"""
from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``)."""
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    out: list[int] = []
    p, n = 0, len(data)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return np.asarray(out, dtype=np.int64)


def nearest_sources(in_size: int, out_size: int) -> np.ndarray:
    """The source index of each output index of a nearest resize from ``in_size`` to ``out_size``, as
    ``F.resize`` computes it for a uint8 mask: the index is resized itself, as base-256 digits in channels."""
    ramp = torch.arange(in_size, dtype=torch.int64)
    digits = torch.stack([(ramp >> (8 * d)) & 255 for d in range(3)]).to(torch.uint8)  # (3, in_size)
    moved = F.resize(tv_tensors.Mask(digits.view(3, 1, in_size)), [1, out_size]).view(3, out_size).long()
    return (moved[0] | (moved[1] << 8) | (moved[2] << 16)).numpy()


class EncodedMasks:
    """``N`` masks of an ``height`` x ``width`` image as compressed COCO RLEs (``pycocotools`` dicts)."""

    def __init__(self, rles: list[dict], height: int, width: int):
        self.rles = rles
        self.height, self.width = int(height), int(width)

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.rles), self.height, self.width

    def decode(self) -> Tensor:
        """(N, H, W) uint8."""
        if not self.rles:
            return torch.zeros(self.shape, dtype=torch.uint8)
        return torch.from_numpy(np.ascontiguousarray(mask_utils.decode(self.rles).transpose(2, 0, 1)))

    def resize(self, new_h: int, new_w: int) -> Tensor:
        """(N, new_h, new_w) uint8, equal to ``F.resize(Mask(self.decode()), [new_h, new_w])`` (nearest)."""
        if new_h * new_w >= self.height * self.width:
            return F.resize(tv_tensors.Mask(self.decode()), [new_h, new_w]).as_subclass(Tensor)
        rows, cols = nearest_sources(self.height, new_h), nearest_sources(self.width, new_w)
        out = torch.zeros((len(self.rles), new_h, new_w), dtype=torch.uint8)
        for k, rle in enumerate(self.rles):
            x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
            # output rows / columns whose source pixel lies in the mask's box; the rest stay 0
            c0, c1 = np.searchsorted(cols, [x, x + w])
            r0, r1 = np.searchsorted(rows, [y, y + h])
            if c0 >= c1 or r0 >= r1:
                continue
            ends = np.cumsum(rle_counts(rle["counts"]))
            # RLEs run down the columns, zeros first: a pixel's run index, odd for ones
            pixels = cols[c0:c1, None] * self.height + rows[None, r0:r1]
            runs = np.searchsorted(ends, pixels, side="right")
            out[k, r0:r1, c0:c1] = torch.from_numpy((runs & 1).astype(np.uint8).T)
        return out
