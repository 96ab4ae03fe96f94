"""Draw detections (masks, boxes, class names and scores) on an image with torchvision.utils."""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .structures import Detections, ImageMeta


def label_color(label: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def tensor_to_pil(image: Tensor, meta: ImageMeta | None = None, mean: Sequence[float] = (0.0, 0.0, 0.0),
                  std: Sequence[float] = (1.0, 1.0, 1.0)) -> Image.Image:
    """A normalised, padded (3, H, W) batch image back to an RGB picture in the original frame.

    The padding is cropped with ``meta["img_size"]``, a flip is undone and the picture is resized to
    ``meta["orig_size"]``, so detections (which live in the original frame) line up with it.
    """
    img = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    meta = meta or {}
    if "img_size" in meta:
        h, w = meta["img_size"]
        img = img[:, :h, :w]
    if meta.get("flip", False):
        img = img.flip(-1)
    pil = Image.fromarray(img.clamp(0, 255).round().byte().permute(1, 2, 0).numpy())
    if "orig_size" in meta:
        oh, ow = meta["orig_size"]
        if (oh, ow) != (pil.height, pil.width):
            pil = pil.resize((int(ow), int(oh)), Image.BILINEAR)
    return pil


def draw_detections(image: Image.Image | np.ndarray, det: Detections, class_names: Sequence[str] | None = None,
                    score_thr: float = 0.3, mask_alpha: float = 0.5, line_width: int = 2,
                    show_scores: bool = True) -> Image.Image:
    """A copy of ``image`` with every detection scoring at least ``score_thr`` drawn on it.

    Masks are blended in the class colour (where masks overlap, the smallest one's), boxes outlined, and
    ``"<class name> <score>"`` written on the class colour inside the box's top-left corner (torchvision's
    ``draw_segmentation_masks`` / ``draw_bounding_boxes``).
    ``det`` must be in the image's frame (``Detections`` are in the original frame).
    """
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    canvas = pil_to_tensor(pil.convert("RGB"))
    scores = det.scores.detach().cpu()
    keep = (scores >= score_thr).nonzero().flatten()
    if len(keep) == 0:  # torchvision warns on an empty list
        return to_pil_image(canvas)
    # largest first, so that a small object in front of a large one stays visible (detectron2's order)
    boxes = det.boxes[keep].detach().cpu().float()
    area = (det.masks[keep].flatten(1).sum(1).cpu() if det.masks is not None
            else (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    order = area.float().argsort(descending=True, stable=True)
    keep, boxes = keep[order], boxes[order]
    labels = det.labels[keep].tolist()
    colors = [label_color(label) for label in labels]
    if det.masks is not None:
        masks = det.masks[keep].detach().cpu().bool()
        if masks.shape[-2:] != canvas.shape[-2:]:
            raise ValueError(f"the detections' mask size {tuple(masks.shape[-2:])} does not match the image "
                             f"{tuple(canvas.shape[-2:])}; pass an image in the detections' (original) frame")
        # torchvision paints a pixel under several masks black; here it shows the last (smallest) mask on it
        owner = torch.full(masks.shape[-2:], -1)
        for i, mask in enumerate(masks):
            owner[mask] = i
        canvas = draw_segmentation_masks(canvas, owner == torch.arange(len(masks)).view(-1, 1, 1), alpha=mask_alpha,
                                         colors=colors)
    names = [class_names[label] if class_names is not None and label < len(class_names) else str(label)
             for label in labels]
    texts = [f"{name} {score:.2f}" for name, score in zip(names, scores[keep].tolist())] if show_scores else names
    canvas = draw_bounding_boxes(canvas, boxes, labels=texts, colors=colors, width=line_width, fill_labels=True)
    return to_pil_image(canvas)
