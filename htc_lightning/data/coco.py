"""COCO instance-segmentation dataset (optionally with COCO-Stuff label maps) and a plain image folder.

The annotation file is checked once, when the dataset is built: a bad category id is an error, degenerate
boxes and polygons are dropped and reported in one warning per kind, missing image files are an error (or
skipped with a warning). Image decoding errors and stuff-map size mismatches surface when the image is read.
"""
from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

from . import packed

Transform = Callable[..., tuple[Tensor, dict]]  # (image, target[, generator=]) -> (image, target)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SHOWN_IDS = 5  # how many offending annotation ids a warning lists


def load_json(path: str | Path) -> dict:
    """Parses a JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def load_rgb(path: str | Path) -> Tensor:
    """Decodes an image file to uint8 (3, H, W) RGB; grayscale, palette, RGBA and CMYK are converted."""
    try:
        with Image.open(path) as im:
            im.load()  # PIL decodes lazily: force it so a truncated file fails here, naming the file
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            array = np.array(rgb)
    except (OSError, SyntaxError, UnidentifiedImageError, ValueError) as e:
        raise OSError(f"cannot decode image {path}: {e}") from e
    # A channels-last view: torchvision's uint8 resize takes its fast path on it, no copy needed here.
    return torch.from_numpy(array).permute(2, 0, 1)


def _ann_ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_SHOWN_IDS])
    return shown + (", ..." if len(ids) > _SHOWN_IDS else "")


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Polygon list, uncompressed RLE or compressed RLE -> (H, W) uint8."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class CocoDetection(Dataset):
    """COCO images with boxes, labels, masks, crowd boxes and (with ``stuff_dir``) semantic maps.

    Labels are contiguous: label ``i`` is category ``cat_ids[i]``. With ``train=True`` images without a
    usable (non-crowd) annotation are left out, as detectors cannot learn from them (mmdet's
    ``filter_empty_gt``); evaluation splits keep every image.
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, transform: Transform | None = None,
                 stuff_dir: str | Path | None = None, train: bool = False,
                 missing_images: Literal["error", "skip"] = "error", cat_ids: list[int] | None = None):
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.stuff_dir = Path(stuff_dir) if stuff_dir is not None else None
        self.transform = transform
        # The cache key: what shapes the records (the folder's mtime changes when image files come or go).
        options = {"image_dir": self.image_dir.resolve(), "train": train, "missing_images": missing_images,
                   "cat_ids": cat_ids, "class": type(self).__qualname__,
                   "image_dir_mtime": self.image_dir.stat().st_mtime_ns if self.image_dir.is_dir() else None}
        self.records = packed.load_or_build(self, self.ann_file, options, [Path(__file__), Path(packed.__file__)],
                                            lambda: self._parse(train, missing_images, cat_ids))

    def _parse(self, train: bool, missing_images: str, cat_ids: list[int] | None) -> list[tuple[dict, list[dict]]]:
        """Reads and checks the annotation file: the records ``(image info, annotations)`` of the split."""
        data = load_json(self.ann_file)
        categories = sorted(data.get("categories", []), key=lambda c: c["id"])
        self.cat_ids = list(cat_ids) if cat_ids is not None else [c["id"] for c in categories]
        names = {c["id"]: c.get("name", str(c["id"])) for c in categories}
        self.class_names = [names.get(c, str(c)) for c in self.cat_ids]
        self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        known_cats = set(names) | set(self.cat_ids)

        images = {img["id"]: img for img in data.get("images", [])}
        anns_by_image: dict[int, list[dict]] = defaultdict(list)
        bad_boxes: list[int] = []
        bad_poly_anns: list[int] = []
        bad_parts = 0
        emptied: list[int] = []
        for ann in data.get("annotations", []):
            ann_id = ann.get("id")
            if ann.get("category_id") not in known_cats:
                raise ValueError(f"annotation {ann_id} in {self.ann_file}: category_id {ann.get('category_id')} "
                                 f"is not in 'categories'")
            if ann.get("image_id") not in images:
                raise ValueError(f"annotation {ann_id} in {self.ann_file}: image_id {ann.get('image_id')} "
                                 f"is not in 'images'")
            if ann["category_id"] not in self.cat_to_label:
                continue  # a category the caller chose not to train on
            x, y, w, h = ann["bbox"]
            info = images[ann["image_id"]]
            inside_w = min(x + w, info.get("width", x + w)) - max(x, 0)
            inside_h = min(y + h, info.get("height", y + h)) - max(y, 0)
            # mmdet's CocoDataset.parse_data_info skips these boxes (w or h < 1, zero area, or outside the image)
            if w < 1 or h < 1 or inside_w <= 0 or inside_h <= 0 or ann.get("area", 1) <= 0:
                bad_boxes.append(ann_id)
                continue
            seg = ann.get("segmentation")
            if isinstance(seg, list):
                # pycocotools needs >= 3 points per polygon part. Like mmdet's LoadAnnotations, drop bad parts
                # and keep an object left without any as an ignored region (its box joins the crowd boxes).
                good = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
                if len(good) != len(seg):
                    bad_poly_anns.append(ann_id)
                    bad_parts += len(seg) - len(good)
                    if not good:
                        emptied.append(ann_id)
                    ann = {**ann, "segmentation": good, "iscrowd": 1 if not good else ann.get("iscrowd", 0)}
            anns_by_image[ann["image_id"]].append(ann)
        if bad_boxes:
            warnings.warn(f"{self.ann_file}: dropped {len(bad_boxes)} annotation(s) with an empty box (zero, negative "
                          f"or < 1 px width/height, zero area, or outside the image; ids {_ann_ids(bad_boxes)})",
                          stacklevel=2)
        if bad_poly_anns:
            warnings.warn(f"{self.ann_file}: dropped {bad_parts} polygon part(s) with fewer than 3 points or an odd "
                          f"number of coordinates from {len(bad_poly_anns)} annotation(s) (ids "
                          f"{_ann_ids(bad_poly_anns)}); {len(emptied)} annotation(s) left without a polygon became "
                          f"ignored regions (crowd boxes)" + (f" (ids {_ann_ids(emptied)})" if emptied else ""),
                          stacklevel=2)

        records = []
        missing = []
        for image_id in sorted(images):
            info = images[image_id]
            path = self.image_dir / info["file_name"]
            if not path.is_file():
                missing.append(path)
                continue
            anns = anns_by_image.get(image_id, [])
            if train and not any(not a.get("iscrowd", 0) for a in anns):
                continue
            records.append((info, anns))
        if missing:
            listed = ", ".join(str(p) for p in missing[:_SHOWN_IDS]) + (", ..." if len(missing) > _SHOWN_IDS else "")
            message = f"{len(missing)} image file(s) listed in {self.ann_file} do not exist: {listed}"
            if missing_images == "error":
                raise FileNotFoundError(message)
            warnings.warn(message + " (skipped)", stacklevel=2)
        return records

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        return self.records.image_ids.tolist()

    @property
    def aspect_groups(self) -> list[int]:
        """0 for landscape (w >= h), 1 for portrait, from the annotation file (no decoding)."""
        sizes = self.records.sizes
        unsized = np.flatnonzero((sizes < 0).any(axis=1))
        if len(unsized):
            raise ValueError(f"image {self.image_ids[unsized[0]]} in {self.ann_file} has no 'width'/'height': "
                             f"grouping by aspect ratio needs them (or set group_by_aspect_ratio=False)")
        return (sizes[:, 1] < sizes[:, 0]).astype(np.int64).tolist()

    def load(self, index: int) -> tuple[Tensor, dict]:
        """The image (uint8 (3, H, W)) and its annotations in the original frame."""
        info, anns = self.records[index]
        path = self.image_dir / info["file_name"]
        image = load_rgb(path)
        height, width = image.shape[-2:]
        if (info.get("height", height), info.get("width", width)) != (height, width):
            raise ValueError(f"image {path} is {width}x{height} but {self.ann_file} says "
                             f"{info.get('width')}x{info.get('height')}")
        things = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        target = {
            "boxes": _xywh_to_xyxy([a["bbox"] for a in things]),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in things], dtype=torch.int64),
            "masks": self._masks(things, height, width),
            "crowd_boxes": _xywh_to_xyxy([a["bbox"] for a in crowd]),
            "meta": {"image_id": int(info["id"]), "file_name": str(info["file_name"]),
                     "orig_size": (int(height), int(width))},
        }
        if self.stuff_dir is not None:
            target["semantic"] = self._semantic(info["file_name"], path, height, width)
        return image, target

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict]:
        """``dataset[i]``, or ``dataset[(i, seed)]`` to draw the augmentation from ``seed`` (see
        ``GroupedBatchSampler(with_seeds=True)``)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, target = self.load(index)
        if self.transform is None:
            return image, target
        if seed is None:
            return self.transform(image, target)
        return self.transform(image, target, generator=torch.Generator().manual_seed(seed))

    def _masks(self, anns: list[dict], height: int, width: int) -> Tensor:
        masks = np.zeros((len(anns), height, width), np.uint8)
        for i, ann in enumerate(anns):
            try:
                masks[i] = segmentation_to_mask(ann["segmentation"], height, width)
            except Exception as e:  # pycocotools raises bare Exceptions on malformed RLE
                raise ValueError(f"annotation {ann.get('id')} in {self.ann_file}: cannot decode segmentation: "
                                 f"{e}") from e
        return torch.from_numpy(masks)

    def _semantic(self, file_name: str, image_path: Path, height: int, width: int) -> Tensor:
        path = self.stuff_dir / (Path(file_name).stem + ".png")
        try:
            with Image.open(path) as im:
                labels = np.array(im if im.mode in ("L", "P") else im.convert("L"))
        except (OSError, SyntaxError, UnidentifiedImageError) as e:
            raise OSError(f"cannot read stuff map {path} (for {image_path}): {e}") from e
        if labels.shape != (height, width):
            raise ValueError(f"stuff map {path} is {labels.shape[1]}x{labels.shape[0]} but its image {image_path} "
                             f"is {width}x{height}")
        return torch.from_numpy(labels)


def _xywh_to_xyxy(boxes: list[list[float]]) -> Tensor:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


class ImageFolder(Dataset):
    """Every image file in a folder (sorted by name) for prediction; ``image_id`` is the index."""

    def __init__(self, folder: str | Path, transform: Transform | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"predict_images folder {self.folder} does not exist")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        path = self.files[index]
        image = load_rgb(path)
        target = {"meta": {"image_id": index, "file_name": path.name, "orig_size": tuple(image.shape[-2:])}}
        return self.transform(image, target) if self.transform is not None else (image, target)
