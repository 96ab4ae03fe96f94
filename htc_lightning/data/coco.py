"""COCO instance-segmentation dataset (optionally with COCO-Stuff label maps) and a plain image folder.

The annotation file is checked once, when the dataset is built: a bad category id, a duplicate image or
annotation id and a non-finite coordinate are errors, degenerate boxes and polygons are dropped and reported in
one warning per kind, missing image files are an error (or skipped with a warning). A bad image file (see
``images.py``) surfaces when it is read, or at once for all files with :meth:`CocoDetection.check_images`;
``bad_images="skip"`` replaces such a sample by another instead of failing.
"""
from __future__ import annotations

import json
import math
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
from .encoded_masks import EncodedMasks
from .images import BadImageError, ImageProblem, check_images, read_rgb

Transform = Callable[..., tuple[Tensor, dict]]  # (image, target[, generator=]) -> (image, target)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SHOWN_IDS = 5  # how many offending annotation ids a warning lists
_MAX_REPLACEMENTS = 16  # bad_images="skip": bad samples tried in a row before giving up


def load_json(path: str | Path, **kwargs) -> dict:
    """Parses a JSON file (``kwargs`` go to ``json.load``); a syntax error names the file, line and column."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f, **kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


load_rgb = read_rgb  # the name other modules import


def _ann_ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_SHOWN_IDS])
    return shown + (", ..." if len(ids) > _SHOWN_IDS else "")


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """Polygon list, uncompressed RLE or compressed RLE -> compressed RLE of an (H, W) image."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Polygon list, uncompressed RLE or compressed RLE -> (H, W) uint8."""
    return mask_utils.decode(segmentation_to_rle(segmentation, height, width))


def _non_finite(values) -> bool:
    return any(not isinstance(v, int | float) or not math.isfinite(v) for v in values)


def _duplicates(ids: list) -> dict:
    seen: dict = {}
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
    return {i: n for i, n in seen.items() if n > 1}


class CocoDetection(Dataset):
    """COCO images with boxes, labels, masks, crowd boxes and (with ``stuff_dir``) semantic maps.

    Labels are contiguous: label ``i`` is category ``cat_ids[i]``. With ``train=True`` images without a
    usable (non-crowd) annotation are left out (mmdet's ``filter_empty_gt``); evaluation splits keep every image.
    ``filter_empty_gt`` decides it explicitly: ``False`` keeps the images without objects in training, where they
    teach the RPN and the RoI heads background only (useful when the deployed images are often empty).

    ``bad_images``: a file that cannot be decoded or is not of its annotated size is an ``"error"`` naming
    it, or with ``"skip"`` is replaced by the next sample of the same orientation (deterministic, so a resumed
    run sees the same data); the replacement's ``meta["skipped"]`` lists ``(file, reason)`` of the samples it
    stands for (empty when none), which ``CocoDataModule`` reports and ``DetectionModule`` counts.
    ``bad_indices`` (e.g. from :meth:`check_images`) are replaced without being read.
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, transform: Transform | None = None,
                 stuff_dir: str | Path | None = None, train: bool = False,
                 missing_images: Literal["error", "skip"] = "error", cat_ids: list[int] | None = None,
                 bad_images: Literal["error", "skip"] = "error", filter_empty_gt: bool | None = None):
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images must be 'error' or 'skip', got {bad_images!r}")
        self.bad_images = bad_images
        self.bad_indices: set[int] = set()
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.stuff_dir = Path(stuff_dir) if stuff_dir is not None else None
        self.transform = transform
        # The cache key: what shapes the records (the folder's mtime changes when image files come or go).
        options = {"image_dir": self.image_dir.resolve(), "train": train, "missing_images": missing_images,
                   "cat_ids": cat_ids, "filter_empty_gt": filter_empty_gt, "class": type(self).__qualname__,
                   "image_dir_mtime": self.image_dir.stat().st_mtime_ns if self.image_dir.is_dir() else None}
        self.records = packed.load_or_build(self, self.ann_file, options, [Path(__file__), Path(packed.__file__)],
                                            lambda: self._parse(train, missing_images, cat_ids, filter_empty_gt))
        if self.stuff_dir is not None:
            self._check_stuff_maps()

    def _parse(self, train: bool, missing_images: str, cat_ids: list[int] | None,
               filter_empty_gt: bool | None) -> list[tuple[dict, list[dict]]]:
        """Reads and checks the annotation file: the records ``(image info, annotations)`` of the split."""
        # NaN / Infinity literals (json.dumps writes them) are noted while parsing, so the coordinates of a clean
        # file are not walked a second time.
        literals: list[str] = []
        data = load_json(self.ann_file, parse_constant=lambda name: literals.append(name) or float(name))
        # an evaluation split without ground truth would score -1 everywhere (CocoDataModule refuses it)
        self.num_annotations = len(data.get("annotations") or [])
        categories = sorted(data.get("categories", []), key=lambda c: c["id"])
        self.cat_ids = list(cat_ids) if cat_ids is not None else [c["id"] for c in categories]
        names = {c["id"]: c.get("name", str(c["id"])) for c in categories}
        self.class_names = [names.get(c, str(c)) for c in self.cat_ids]
        self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        known_cats = set(names) | set(self.cat_ids)

        images = {img["id"]: img for img in data.get("images", [])}
        self._check_unique_ids(data)
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
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or _non_finite(bbox) or _non_finite([ann.get("area", 1)]):
                raise ValueError(f"annotation {ann_id} (image {ann['image_id']}) in {self.ann_file}: bbox {bbox} and "
                                 f"area {ann.get('area')} must be finite numbers, bbox as [x, y, width, height]: "
                                 "fix or remove the annotation")
            if literals and isinstance(ann.get("segmentation"), list) and any(
                    _non_finite(part) for part in ann["segmentation"]):
                raise ValueError(f"annotation {ann_id} (image {ann['image_id']}) in {self.ann_file}: its polygon has a "
                                 "non-finite coordinate (NaN or Infinity): fix or remove the annotation")
            x, y, w, h = bbox
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
        drop_empty = train if filter_empty_gt is None else filter_empty_gt
        for image_id in sorted(images):
            info = images[image_id]
            path = self.image_dir / info["file_name"]
            if not path.is_file():
                missing.append(path)
                continue
            anns = anns_by_image.get(image_id, [])
            if drop_empty and not any(not a.get("iscrowd", 0) for a in anns):
                continue
            records.append((info, anns))
        if missing:
            listed = ", ".join(str(p) for p in missing[:_SHOWN_IDS]) + (", ..." if len(missing) > _SHOWN_IDS else "")
            message = f"{len(missing)} image file(s) listed in {self.ann_file} do not exist: {listed}"
            if missing_images == "error":
                raise FileNotFoundError(message)
            warnings.warn(message + " (skipped)", stacklevel=2)
        return records

    def _check_unique_ids(self, data: dict) -> None:
        # pycocotools indexes both by id: a repeated id silently merges two images (or annotations) into one
        for kind, items in (("image", data.get("images", [])), ("annotation", data.get("annotations") or [])):
            repeated = _duplicates([item.get("id") for item in items])
            if repeated:
                listed = ", ".join(f"{i} ({n} times)" for i, n in list(repeated.items())[:_SHOWN_IDS])
                more = ", ..." if len(repeated) > _SHOWN_IDS else ""
                raise ValueError(f"{self.ann_file}: {len(repeated)} {kind} id(s) are used more than once: "
                                 f"{listed}{more}. Each {kind} needs its own id: renumber them")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        return self.records.image_ids.tolist()

    @property
    def image_labels(self) -> list[set[int]]:
        """The labels of each image's (non-crowd) objects, from the annotation file (repeat-factor sampling)."""
        return [{self.cat_to_label[a["category_id"]] for a in anns if not a.get("iscrowd", 0)}
                for _, anns in self.records]

    @property
    def aspect_groups(self) -> list[int]:
        """0 for landscape (w >= h), 1 for portrait, from the annotation file (no decoding)."""
        sizes = self.records.sizes
        unsized = np.flatnonzero((sizes < 0).any(axis=1))
        if len(unsized):
            raise ValueError(f"image {self.image_ids[unsized[0]]} in {self.ann_file} has no 'width'/'height': "
                             f"grouping by aspect ratio needs them (or set group_by_aspect_ratio=False)")
        return (sizes[:, 1] < sizes[:, 0]).astype(np.int64).tolist()

    def load(self, index: int, encoded_masks: bool = False) -> tuple[Tensor, dict]:
        """The image (uint8 (3, H, W), upright) and its annotations in the original frame; ``encoded_masks``
        keeps the masks as :class:`EncodedMasks` for the transform to decode at its output size."""
        info, anns = self.records[index]
        path = self.image_dir / info["file_name"]
        expected = (info["width"], info["height"]) if "width" in info and "height" in info else None
        image = read_rgb(path, expected)
        height, width = image.shape[-2:]
        things = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        target = {
            "boxes": _xywh_to_xyxy([a["bbox"] for a in things]),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in things], dtype=torch.int64),
            "masks": self._rles(things, height, width) if encoded_masks else self._masks(things, height, width),
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
        image, target = self._load_or_replace(index)
        if self.transform is None:
            return image, target
        if seed is None:
            return self.transform(image, target)
        return self.transform(image, target, generator=torch.Generator().manual_seed(seed))

    def _load_or_replace(self, index: int) -> tuple[Tensor, dict]:
        encoded = self.transform is not None
        if self.bad_images == "error":
            return self.load(index, encoded)
        skipped: list[tuple[str, str]] = []
        for candidate in self._replacements(index):
            if candidate in self.bad_indices:
                skipped.append((str(self.image_dir / self.records[candidate][0]["file_name"]), "found by check_images"))
            else:
                try:
                    image, target = self.load(candidate, encoded)
                except BadImageError as e:
                    skipped.append((e.path, e.reason))
                else:
                    target["meta"]["skipped"] = skipped
                    return image, target
            if len(skipped) > _MAX_REPLACEMENTS:
                break
        listed = "; ".join(f"{p}: {r}" for p, r in skipped[:_SHOWN_IDS])
        raise BadImageError(self.image_dir, f"bad_images=skip found {len(skipped)} bad image(s) in a row from sample "
                                            f"{index} ({listed}, ...): the data looks broken at large",
                            hint="check it with `python -m htc_lightning.tools.check_dataset`")

    def _aspect_group(self, index: int) -> int:
        info = self.records[index][0]
        return int(info.get("width", 1) < info.get("height", 0))

    def _replacements(self, index: int):
        """``index``, then the following indices (cyclically) of its aspect group, so that a grouped batch keeps
        one orientation, then the others: the order depends on the dataset only."""
        group, others = self._aspect_group(index), []
        yield index
        for step in range(1, len(self)):
            candidate = (index + step) % len(self)
            if self._aspect_group(candidate) == group:
                yield candidate
            else:
                others.append(candidate)
        yield from others

    def check_images(self, num_threads: int = 16, decode: bool = False, rank: int = 0,
                     world_size: int = 1) -> list[ImageProblem]:
        """Every bad image file of this split (``images.check_image``: header, size, mode, EXIF, end marker;
        ``decode`` decodes each file fully), ``ImageProblem.index`` being the dataset index. With ``world_size``
        > 1 this rank checks its share only (the caller gathers)."""
        indices = list(range(rank, len(self), world_size))
        items = []
        for i in indices:
            info = self.records[i][0]
            size = (info["width"], info["height"]) if "width" in info and "height" in info else None
            items.append((self.image_dir / info["file_name"], size))
        found = check_images(items, num_threads, decode)
        return [ImageProblem(indices[p.index], p.path, p.reason) for p in found]

    def _rles(self, anns: list[dict], height: int, width: int) -> EncodedMasks:
        rles = []
        for ann in anns:
            try:
                rle = segmentation_to_rle(ann["segmentation"], height, width)
            except Exception as e:  # pycocotools raises bare Exceptions on malformed RLE
                raise ValueError(f"annotation {ann.get('id')} in {self.ann_file}: cannot decode segmentation: "
                                 f"{e}") from e
            if list(rle.get("size", ())) != [height, width]:
                raise ValueError(f"annotation {ann.get('id')} in {self.ann_file}: its RLE is of size {rle.get('size')}"
                                 f" but its image is {height}x{width} (height x width)")
            rles.append(rle)
        return EncodedMasks(rles, height, width)

    def _masks(self, anns: list[dict], height: int, width: int) -> Tensor:
        masks = np.zeros((len(anns), height, width), np.uint8)
        for i, ann in enumerate(anns):
            try:
                masks[i] = segmentation_to_mask(ann["segmentation"], height, width)
            except Exception as e:  # pycocotools raises bare Exceptions on malformed RLE
                raise ValueError(f"annotation {ann.get('id')} in {self.ann_file}: cannot decode segmentation: "
                                 f"{e}") from e
        return torch.from_numpy(masks)

    def _stuff_map_path(self, file_name: str) -> Path:
        return self.stuff_dir / (Path(file_name).stem + ".png")

    def _check_stuff_maps(self) -> None:
        # At set-up, not at the first batch: a run must not build the model and start only to fail on a missing map.
        fixes = (f"HTC's semantic branch trains on COCO-Stuff label maps. Either provide them ({self.stuff_dir}/"
                 "<image file stem>.png, e.g. COCO-Stuff's stuffthingmaps_trainval2017.zip unpacked in the data root), "
                 "or train without the semantic branch: --config configs/tiny/htc-without-semantic_tiny_coco.yaml "
                 "(configs/htc/htc-without-semantic_r50_fpn_1x_coco.yaml at full size), or add "
                 "--data.init_args.stuff_maps null --model.init_args.detector.init_args.roi_head.init_args."
                 "semantic_head null to this config")
        if not self.stuff_dir.is_dir():
            raise FileNotFoundError(f"COCO-Stuff maps folder {self.stuff_dir} does not exist (for the images of "
                                    f"{self.ann_file}). {fixes}")
        present = {p.name for p in self.stuff_dir.iterdir()}
        missing = [str(self._stuff_map_path(info["file_name"])) for info, _ in self.records
                   if self._stuff_map_path(info["file_name"]).name not in present]
        if missing:
            listed = ", ".join(missing[:_SHOWN_IDS]) + (", ..." if len(missing) > _SHOWN_IDS else "")
            raise FileNotFoundError(f"{len(missing)} of {len(self.records)} COCO-Stuff maps missing in {self.stuff_dir}"
                                    f": {listed}. {fixes}")

    def _semantic(self, file_name: str, image_path: Path, height: int, width: int) -> Tensor:
        path = self._stuff_map_path(file_name)
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
    """Images to predict on: one image file, or every image file of a folder (sorted by name).

    ``image_id`` is COCO's id when every file name is one (COCO names its files by their zero-padded id,
    ``000000397133.jpg``), so the predictions can be scored against COCO's json; otherwise it is the file's
    position in the sorted list. ``meta["file_name"]`` and ``meta["path"]`` say which file an id is.
    """

    def __init__(self, path: str | Path, transform: Transform | None = None):
        self.path = Path(path)
        if self.path.is_file():
            if self.path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"predict_images {self.path} is not an image file (expected one of "
                                 f"{', '.join(IMAGE_SUFFIXES)})")
            self.files = [self.path]
        elif self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise FileNotFoundError(f"predict_images folder {self.path} has no image file "
                                        f"({', '.join(IMAGE_SUFFIXES)})")
        else:
            raise FileNotFoundError(f"predict_images {self.path} is neither an image file nor a folder")
        self.transform = transform
        stems = [p.stem for p in self.files]
        coco_ids = [int(s) for s in stems] if all(s.isdigit() for s in stems) else []
        self.image_ids = coco_ids if len(set(coco_ids)) == len(self.files) else list(range(len(self.files)))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        path = self.files[index]
        image = load_rgb(path)
        target = {"meta": {"image_id": self.image_ids[index], "file_name": path.name, "path": str(path.resolve()),
                           "orig_size": tuple(image.shape[-2:])}}
        return self.transform(image, target) if self.transform is not None else (image, target)
