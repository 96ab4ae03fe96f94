"""A tiny COCO-2017-shaped dataset of coloured shapes, for tests, demos and smoke training.

``python -m htc_lightning.data.synthetic --out DIR --num-train N --num-val M --seed S [--image-size H W]``
writes ``train2017/``, ``val2017/`` (JPEG), ``annotations/instances_{train,val}2017.json`` and
``stuffthingmaps/{train,val}2017/*.png`` (COCO-Stuff convention: pixel = category_id - 1, 255 = unlabeled).

Every thing class is one shape in one colour family, so a small detector learns it in minutes. The
annotation file exercises what real COCO contains: polygons (unoccluded objects), uncompressed and
compressed RLE (occluded objects and rings, whose holes a single polygon cannot express), ``iscrowd=1``
regions and non-contiguous category ids. Masks are the rasterised annotations themselves, so what is
drawn and what is annotated agree to the pixel.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# (category id, name, shape, base RGB): ids are deliberately non-contiguous like COCO's 1..90.
THING_CLASSES: list[tuple[int, str, str, tuple[int, int, int]]] = [
    (1, "box", "rectangle", (215, 45, 40)),
    (3, "disc", "ellipse", (45, 190, 60)),
    (7, "triangle", "triangle", (45, 75, 225)),
    (10, "ring", "ring", (235, 195, 30)),
    (15, "cross", "cross", (195, 50, 200)),
    (20, "diamond", "diamond", (30, 195, 205)),
]
# Background textures; ids above the thing ids as COCO-Stuff's 92..182.
STUFF_CLASSES: list[tuple[int, str]] = [(92, "stripes"), (105, "checker"), (124, "speckle")]
UNLABELED = 255


def _shape_polygons(shape: str, cx: float, cy: float, size: float, aspect: float, angle: float) -> list[np.ndarray]:
    """Outline(s) of a shape as (K, 2) xy arrays; a ring returns [outer, inner]."""
    w, h = size * math.sqrt(aspect) / 2, size / math.sqrt(aspect) / 2
    if shape == "rectangle":
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    elif shape in ("ellipse", "ring"):
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([w * np.cos(t), h * np.sin(t)], 1)
    elif shape == "triangle":
        t = angle + np.array([0, 2 * math.pi / 3, 4 * math.pi / 3])
        r = size / 2
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif shape == "cross":
        a, b = w, h / 3  # arm half-length and half-thickness
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                        [-a, -b], [-b, -b]])
    elif shape == "diamond":
        pts = np.array([[0, -h], [w, 0], [0, h], [-w, 0]])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    polys = [pts + (cx, cy)]
    if shape == "ring":
        polys.append(pts * 0.55 + (cx, cy))
    return polys


def _fit_inside(polys: list[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    """Shift (then clip) outlines so the shape lies inside the image."""
    lo = polys[0].min(0)
    hi = polys[0].max(0)
    shift = np.maximum(0.0, -lo) - np.maximum(0.0, hi - (width - 1, height - 1))
    return [np.clip(p + shift, 0, (width - 1, height - 1)).round(2) for p in polys]


def _rasterise(polys: list[list[float]], height: int, width: int) -> np.ndarray:
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    return mask_utils.decode(rle).astype(bool)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's list-of-run-lengths form (column-major, starting with a run of zeros)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(s) for s in rle["size"]]}


def _texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(90, 150)
    if kind == "stripes":
        period = rng.uniform(6, 14)
        v = base + 35 * np.sin(2 * math.pi * (xx + yy) / period)
        tint = (1.0, 0.95, 0.8)
    elif kind == "checker":
        cell = int(rng.integers(5, 10))
        v = base + 30 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1)
        tint = (0.85, 0.9, 1.0)
    else:
        v = base + rng.normal(0, 25, (height, width))
        tint = (0.9, 0.85, 0.75)
    return np.clip(v[..., None] * np.array(tint, np.float32), 0, 255)


def _render_image(height: int, width: int, rng: np.random.Generator, with_crowd: bool):
    """Returns the RGB image, the stuff label map and the annotations (without ids)."""
    # Two stuff regions split by a line, with a thin unlabeled band as COCO-Stuff has at region borders.
    kinds = rng.choice(len(STUFF_CLASSES), 2, replace=False)
    image = np.empty((height, width, 3), np.float32)
    stuff = np.empty((height, width), np.uint8)
    vertical = bool(rng.integers(2))
    extent = width if vertical else height
    cut = int(rng.integers(extent // 4, 3 * extent // 4 + 1))
    coord = np.mgrid[0:height, 0:width][1 if vertical else 0]
    for region, k in zip((coord < cut, coord >= cut), kinds):
        image[region] = _texture(STUFF_CLASSES[k][1], height, width, rng)[region]
        stuff[region] = STUFF_CLASSES[k][0] - 1
    stuff[np.abs(coord - cut) <= 1] = UNLABELED

    side = min(height, width)
    layers: list[dict] = []  # bottom to top
    if with_crowd:
        cat, _, _, rgb = THING_CLASSES[int(rng.integers(len(THING_CLASSES)))]
        cw, ch = int(side * rng.uniform(0.3, 0.45)), int(side * rng.uniform(0.2, 0.3))
        x0, y0 = int(rng.integers(0, width - cw)), int(rng.integers(0, height - ch))
        polys = []
        for _ in range(int(rng.integers(6, 12))):
            r = side * rng.uniform(0.03, 0.05)
            t = np.linspace(0, 2 * math.pi, 12, endpoint=False)
            c = (x0 + rng.uniform(0, cw), y0 + rng.uniform(0, ch))
            polys.append(np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], 1).clip(0, (width - 1, height - 1)))
        full = _rasterise([p.round(2).ravel().tolist() for p in polys], height, width)
        layers.append({"cat": cat, "rgb": rgb, "full": full, "crowd": True, "polys": None})

    things: list[dict] = []
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(len(THING_CLASSES)))
        cat, _, shape, rgb = THING_CLASSES[cls]
        for _attempt in range(20):
            size = side * rng.uniform(0.15, 0.6)
            polys = _fit_inside(_shape_polygons(shape, rng.uniform(0, width), rng.uniform(0, height), size,
                                                rng.uniform(0.6, 1.6), rng.uniform(0, 2 * math.pi)), width, height)
            outer = _rasterise([polys[0].ravel().tolist()], height, width)
            full = outer & ~_rasterise([polys[1].ravel().tolist()], height, width) if len(polys) > 1 else outer
            # Keep occlusion partial: the new shape may hide at most half of any earlier object.
            if full.sum() >= 16 and all((t["full"] & ~full).sum() >= 0.5 * t["full"].sum() for t in things):
                things.append({"cat": cat, "rgb": rgb, "full": full, "crowd": False, "polys": polys, "shape": shape})
                break
    layers += things

    annotations = []
    for i, layer in enumerate(layers):
        above = np.zeros((height, width), bool)
        for upper in layers[i + 1:]:
            above |= upper["full"]
        visible = layer["full"] & ~above
        colour = np.clip(np.array(layer["rgb"]) + rng.integers(-25, 26, 3), 0, 255)
        image[layer["full"]] = colour  # later layers paint over: occlusion
        if not visible.any():
            continue
        stuff[visible] = layer["cat"] - 1
        occluded = bool((layer["full"] & above).any())
        if layer["crowd"]:
            segmentation = _uncompressed_rle(visible)
        elif occluded or layer["shape"] == "ring":
            segmentation = _compressed_rle(visible) if rng.random() < 0.5 else _uncompressed_rle(visible)
        else:
            segmentation = [p.ravel().tolist() for p in layer["polys"]]
        ys, xs = np.nonzero(visible)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
        annotations.append({"category_id": layer["cat"], "segmentation": segmentation, "area": float(visible.sum()),
                            "bbox": bbox, "iscrowd": int(layer["crowd"])})
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), stuff, annotations


def _write_split(root: Path, split: str, num_images: int, first_id: int, image_size: tuple[int, int],
                 rng: np.random.Generator) -> None:
    height, width = image_size
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "stuffthingmaps" / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = first_id + i
        name = f"{image_id:012d}"
        # Every fifth image (from the third) holds a crowd region, so even tiny splits have one.
        rgb, stuff, anns = _render_image(height, width, rng, with_crowd=i % 5 == 2)
        Image.fromarray(rgb).save(root / split / f"{name}.jpg", quality=92)
        Image.fromarray(stuff).save(root / "stuffthingmaps" / split / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": height, "width": width})
        for ann in anns:
            annotations.append({"id": 0, "image_id": image_id, **ann})
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _, _ in THING_CLASSES]
    base = first_id * 100
    for k, ann in enumerate(annotations):
        ann["id"] = base + k + 1
    dataset = {"info": {"description": "htc-lightning synthetic shapes", "version": "1.0"}, "licenses": [],
               "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    name = split.replace("2017", "")
    (root / "annotations" / f"instances_{name}2017.json").write_text(json.dumps(dataset, separators=(",", ":")))


def make_synthetic_coco(out: str | Path, num_train: int, num_val: int, seed: int,
                        image_size: tuple[int, int] = (128, 128)) -> Path:
    """Writes the dataset under ``out`` and returns its path; the same arguments give identical files."""
    root = Path(out)
    rng = np.random.default_rng(seed)
    _write_split(root, "train2017", num_train, 1, image_size, rng)
    _write_split(root, "val2017", num_val, 1_000_000, image_size, rng)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    args = parser.parse_args(argv)
    root = make_synthetic_coco(args.out, args.num_train, args.num_val, args.seed, tuple(args.image_size))
    print(f"wrote {args.num_train} train / {args.num_val} val images to {root}")


if __name__ == "__main__":
    main()
