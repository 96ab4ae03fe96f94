"""Containers passed between the parts (the batch below, the image meta, the detections), and the one place where
boxes change coordinate frame.

Batch: ``images`` float32 (B, 3, H, W), normalised, padded; ``targets`` one dict per image:

- ``boxes`` (N, 4) float xyxy in the resized frame, ``labels`` (N,) int64 contiguous 0..C-1,
- ``masks`` (N, H, W) uint8 at the padded batch size (zeros in the padding),
- ``semantic`` (H, W) int64 at the padded batch size, 255 = ignore (only when stuff maps are loaded),
- ``crowd_boxes`` (K, 4) float xyxy (ignored in assignment),
- ``meta``: an :class:`ImageMeta` dict.

Frames and sizes. Every *size* is (h, w), as tensors are laid out: ``orig_size`` of the file on disk,
``img_size`` after the resize (before padding), ``pad_size`` of the padded batch. Every *factor* is (x, y),
as boxes are laid out (x1, y1, x2, y2): ``scale_factor`` = (w_resized / w_orig, h_resized / h_orig), mmdet's
order, so that ``resized = original * scale_factor`` per axis. Boxes live in one of two frames:

- the *resized* frame (``img_size``): targets, proposals, the RoI head's work;
- the *original* frame (``orig_size``): what ``Detector.predict`` returns and COCO evaluates.

:func:`to_original_frame` and :func:`to_resized_frame` are the only conversions between them; both need
``scale_factor`` and say which image lacks it. Scales of a resize (the datamodule's ``test_scale``, TTA's
``scales``) are (long edge, short edge) pairs, a third order, because they bound edges, not axes.
"""
from dataclasses import dataclass
from typing import Any, TypedDict

from torch import Tensor


class ImageMeta(TypedDict, total=False):
    image_id: int
    file_name: str
    path: str                       # the image file, absolute (prediction on a folder or a file)
    orig_size: tuple[int, int]      # (h, w) of the file on disk
    img_size: tuple[int, int]       # (h, w) after resize, before padding
    pad_size: tuple[int, int]       # (h, w) of the padded batch
    scale_factor: tuple[float, float]  # (x, y) = (w_scale, h_scale) as mmdet: resized = orig * scale
    flip: bool


def image_name(meta: ImageMeta) -> str:
    """How errors name an image: its id and file when the meta has them."""
    parts = [str(meta[k]) for k in ("image_id", "file_name") if k in meta]
    return f"image {' '.join(parts)}" if parts else "an image without image_id/file_name"


def require(meta: ImageMeta, field: str, why: str) -> Any:
    """``meta[field]``, or a ValueError naming the image, the field and what needs it."""
    if field not in meta or meta[field] is None:
        raise ValueError(f"{image_name(meta)}: its meta has no {field!r}, which {why} (meta keys: {sorted(meta)})")
    return meta[field]


def scale_factor_of(meta: ImageMeta) -> tuple[float, float]:
    """The meta's (x, y) resize factor, required: a missing one would silently leave boxes in the wrong frame."""
    sx, sy = require(meta, "scale_factor", "maps boxes between the resized and the original frame")
    return float(sx), float(sy)


def pad_size_of(meta: ImageMeta, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The padded batch size (h, w), required: anchors' valid flags are computed against it (mmdet's
    ``pad_shape``), and the image size in its place would flag different anchors. Given the image's ``img_size``,
    a padded size smaller than it (a collate bug) is an error naming the image."""
    h, w = require(meta, "pad_size", "the anchors' valid flags are computed against (mmdet's pad_shape)")
    if img_size is not None and (int(h) < int(img_size[0]) or int(w) < int(img_size[1])):
        raise ValueError(f"{image_name(meta)}: pad_size {(int(h), int(w))} is smaller than its img_size "
                         f"{tuple(int(v) for v in img_size)}")
    return int(h), int(w)


def scale_boxes(boxes: Tensor, factor: tuple[float, float], inverse: bool = False) -> Tensor:
    """xyxy boxes (..., 4) times an (x, y) ``factor`` per axis, or divided by it with ``inverse`` (a true
    division, not a product with the reciprocal: the bits mmdet's ``bboxes / scale_factor`` gives)."""
    fx, fy = factor
    f = boxes.new_tensor([fx, fy, fx, fy])
    return boxes / f if inverse else boxes * f


def to_original_frame(boxes: Tensor, meta: ImageMeta) -> Tensor:
    """Boxes (..., 4) of the resized frame -> the original image's frame (mmdet's ``rescale=True``)."""
    return scale_boxes(boxes, scale_factor_of(meta), inverse=True)


def to_resized_frame(boxes: Tensor, meta: ImageMeta) -> Tensor:
    """Boxes (..., 4) of the original image's frame -> the resized frame."""
    return scale_boxes(boxes, scale_factor_of(meta))


@dataclass
class Detections:
    """One image's detections, in the original image frame unless the producer says otherwise (``rescale=False``
    keeps the resized frame). ``labels`` are contiguous 0..C-1."""

    boxes: Tensor                 # (N, 4) float xyxy
    scores: Tensor                # (N,)
    labels: Tensor                # (N,) int64
    masks: Tensor | None = None   # (N, H, W) bool, or None for box-only / proposal models

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device),
                          None if self.masks is None else self.masks.to(device))
