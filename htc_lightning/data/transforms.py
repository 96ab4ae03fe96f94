"""Resize (keep ratio), flip, normalise and pad: mmdetection's detection pipeline on tv_tensors.

Sizes follow mmcv's ``imrescale`` (``scale = min(long / max(h, w), short / min(h, w))``, new size rounded
with ``int(x * scale + 0.5)``) so resized shapes, and therefore anchors and RoIs, match mmdet's. Boxes,
instance masks and the semantic map go through the same torchvision.transforms.v2 kernels as the image
(masks nearest), so they cannot drift apart. Boxes are clipped to the resized image, as mmdet's ``Resize``
(``clip_object_border=True``) does; masks given as :class:`EncodedMasks` are decoded at the output size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from htc_lightning.structures import ImageMeta

from .encoded_masks import EncodedMasks

# mmdetection's ImageNet statistics, RGB order, on 0..255 pixels.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
SEMANTIC_IGNORE = 255


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w) fitting (h, w) inside ``scale`` = (long edge, short edge), keeping the aspect ratio."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def sample_train_scale(scales: Sequence[tuple[int, int]], short_range: tuple[int, int] | None = None,
                       max_long: int = 1600, generator: torch.Generator | None = None) -> tuple[int, int]:
    """One (long, short) target scale for a training image.

    ``short_range`` reproduces the 2018 entry's multi-scale training (mmdet ``RandomResize`` between
    (max_long, lo) and (max_long, hi)): the short edge is uniform over the integers in [lo, hi] and the long
    edge capped at ``max_long``. Otherwise one of ``scales`` is picked uniformly (``RandomChoiceResize``).
    """
    if short_range is not None:
        lo, hi = min(short_range), max(short_range)
        return max_long, int(torch.randint(lo, hi + 1, (), generator=generator))
    if len(scales) == 0:
        raise ValueError("train_scales is empty and no train_short_range was given")
    return tuple(scales[int(torch.randint(len(scales), (), generator=generator))])


class DetectionTransform:
    """Image + annotations -> resized, optionally flipped, normalised image and targets (unpadded).

    ``target`` holds ``boxes`` (N, 4) xyxy, ``labels``, ``masks`` (N, H, W) uint8 or :class:`EncodedMasks`,
    optional ``semantic``
    (H, W) and ``crowd_boxes`` (K, 4), all in the frame of ``image`` (uint8 (3, H, W)), and a ``meta``
    dict; the result adds ``img_size``, ``scale_factor`` and ``flip`` to ``meta``. Random choices come
    from ``generator`` (default: torch's global generator).
    """

    def __init__(self, scales: Sequence[tuple[int, int]] = ((1333, 800),), short_range: tuple[int, int] | None = None,
                 max_long: int = 1600, flip_prob: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, antialias: bool = False):
        self.scales = [tuple(int(v) for v in s) for s in scales]
        self.short_range = tuple(short_range) if short_range is not None else None
        self.max_long = max_long
        self.flip_prob = flip_prob
        self.mean = list(mean)
        self.std = list(std)
        # mmcv resizes with cv2's bilinear, which does not low-pass filter when shrinking.
        self.antialias = antialias

    def __call__(self, image: Tensor, target: dict, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        height, width = image.shape[-2:]
        scale = sample_train_scale(self.scales, self.short_range, self.max_long, generator)
        new_h, new_w = rescale_size(height, width, scale)
        flip = self.flip_prob > 0 and bool(torch.rand((), generator=generator) < self.flip_prob)

        items = {"image": tv_tensors.Image(image)}
        for key in ("boxes", "crowd_boxes"):
            if key in target:
                items[key] = tv_tensors.BoundingBoxes(target[key], format="XYXY", canvas_size=(height, width))
        for key in ("masks", "semantic"):
            if key in target:
                items[key] = target[key] if isinstance(target[key], EncodedMasks) else tv_tensors.Mask(target[key])
        out = {}
        for key, item in items.items():
            if isinstance(item, EncodedMasks):
                item = tv_tensors.Mask(item.resize(new_h, new_w))
            else:
                item = F.resize(item, [new_h, new_w], antialias=self.antialias)
            if isinstance(item, tv_tensors.BoundingBoxes):
                item = F.clamp_bounding_boxes(item, clamping_mode="hard")
            if flip:
                item = F.horizontal_flip(item)  # boxes: x -> W - x in float, as mmdet 3.x
            out[key] = item.as_subclass(Tensor)

        result = {k: v for k, v in target.items() if k not in out}
        result.update({k: v for k, v in out.items() if k != "image"})
        meta: ImageMeta = dict(target.get("meta", {}))
        meta.update(img_size=(new_h, new_w), scale_factor=(new_w / width, new_h / height), flip=flip)
        result["meta"] = meta
        # (x - mean) / std, dividing as mmengine's data preprocessor does (x * (1 / std) differs by 1 ulp on
        # a quarter of the pixels); in place on a contiguous float copy: the channels-last resize output is slow.
        pixels = F.normalize(out["image"].contiguous().float(), self.mean, self.std, inplace=True)
        return pixels, result


def _ceil_to(value: int, divisor: int) -> int:
    return (value + divisor - 1) // divisor * divisor


class DetectionCollate:
    """Pads a list of (image, target) to one batch: images with 0 (after normalisation, as mmdet's data
    preprocessor), masks with 0, semantic maps with 255, all at the batch's largest size rounded up to
    ``size_divisor``."""

    def __init__(self, size_divisor: int = 32):
        self.size_divisor = size_divisor

    def __call__(self, batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
        pad_h = _ceil_to(max(img.shape[-2] for img, _ in batch), self.size_divisor)
        pad_w = _ceil_to(max(img.shape[-1] for img, _ in batch), self.size_divisor)
        images = batch[0][0].new_zeros((len(batch), 3, pad_h, pad_w))
        targets = []
        for i, (img, target) in enumerate(batch):
            h, w = img.shape[-2:]
            images[i, :, :h, :w] = img
            target = dict(target)
            if "masks" in target:
                masks = target["masks"]
                padded = masks.new_zeros((masks.shape[0], pad_h, pad_w))
                padded[:, :h, :w] = masks
                target["masks"] = padded
            if "semantic" in target:
                semantic = torch.full((pad_h, pad_w), SEMANTIC_IGNORE, dtype=torch.int64)
                semantic[:h, :w] = target["semantic"]
                target["semantic"] = semantic
            target["meta"] = {**target["meta"], "pad_size": (pad_h, pad_w)}
            targets.append(target)
        return images, targets
