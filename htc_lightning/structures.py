"""Containers passed between the parts (see DESIGN.md "Interfaces between the parts").

Batch: ``images`` float32 (B, 3, H, W), normalised, padded; ``targets`` one dict per image:

- ``boxes`` (N, 4) float xyxy in the resized frame, ``labels`` (N,) int64 contiguous 0..C-1,
- ``masks`` (N, H, W) uint8 at the padded batch size (zeros in the padding),
- ``semantic`` (H, W) int64 at the padded batch size, 255 = ignore (only when stuff maps are loaded),
- ``crowd_boxes`` (K, 4) float xyxy (ignored in assignment),
- ``meta``: an :class:`ImageMeta` dict.
"""
from dataclasses import dataclass
from typing import TypedDict

from torch import Tensor


class ImageMeta(TypedDict, total=False):
    image_id: int
    file_name: str
    orig_size: tuple[int, int]      # (h, w) of the file on disk
    img_size: tuple[int, int]       # (h, w) after resize, before padding
    pad_size: tuple[int, int]       # (h, w) of the padded batch
    scale_factor: tuple[float, float]  # (w_scale, h_scale) as mmdet: resized = orig * scale
    flip: bool


@dataclass
class Detections:
    """One image's detections, in the original image frame. ``labels`` are contiguous 0..C-1."""

    boxes: Tensor                 # (N, 4) float xyxy
    scores: Tensor                # (N,)
    labels: Tensor                # (N,) int64
    masks: Tensor | None = None   # (N, H, W) bool, or None for box-only / proposal models

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device),
                          None if self.masks is None else self.masks.to(device))
