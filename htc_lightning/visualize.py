"""Draw detections (masks, boxes, class names and scores) on an image with PIL."""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

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

    Masks are blended in the class colour, boxes outlined, and ``"<class name> <score>"`` written at the
    box's top-left corner. ``det`` must be in the image's frame (``Detections`` are in the original frame).
    """
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    canvas = np.asarray(pil.convert("RGB"), dtype=np.float32).copy()
    keep = (det.scores >= score_thr).nonzero().flatten().tolist()
    if det.masks is not None:
        for i in keep:
            mask = det.masks[i].detach().cpu().numpy().astype(bool)
            if mask.shape != canvas.shape[:2]:
                raise ValueError(f"detection {i}: mask {mask.shape} does not match the image "
                                 f"{canvas.shape[:2]}; pass an image in the detections' (original) frame")
            color = np.array(label_color(int(det.labels[i])), dtype=np.float32)
            canvas[mask] = (1 - mask_alpha) * canvas[mask] + mask_alpha * color
    out = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i in keep:
        label = int(det.labels[i])
        color = label_color(label)
        x0, y0, x1, y1 = (float(v) for v in det.boxes[i].tolist())
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line_width)
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        text = f"{name} {float(det.scores[i]):.2f}" if show_scores else name
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        ty = max(0.0, y0 - (bottom - top) - 2)
        draw.rectangle([x0, ty, x0 + (right - left) + 2, ty + (bottom - top) + 2], fill=color)
        draw.text((x0 + 1, ty), text, fill=(0, 0, 0), font=font)
    return out
