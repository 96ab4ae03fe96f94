"""``Predictor``: a trained checkpoint as a Python function, ``photo -> detections with class names``.

    from htc_lightning import Predictor
    p = Predictor("outputs/run/checkpoints/last.ckpt", device="cuda", precision="16-mixed")
    result = p("photo.jpg")                     # or a PIL image, an array, a tensor, or a list of them
    result.boxes, result.scores, result.names   # original image frame, class names from the checkpoint
    p.draw("photo.jpg", result).save("out.png")

Our checkpoints hold everything needed: the detector's constructor arguments (LightningCLI's hyper-parameters),
the test scale and normalisation (the datamodule's), and the categories. An mmdetection model-zoo file has
none of these: pass the YAML config it matches (``Predictor("htc.pth", config="configs/htc/...yaml")``); its
categories default to COCO's 80.

It runs the steps ``htc-lightning predict`` runs, not copies of them: the datamodule's test-time transform and
collate (:meth:`CocoDataModule.eval_pipeline`) and :meth:`DetectionModule.predict_batch`.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor

from .checkpoints.upgrade import detector_config
from .data.coco import IMAGE_SUFFIXES, load_rgb
from .data.datamodule import CocoDataModule
from .module import DetectionModule
from .structures import Detections

Precision = Literal["32", "32-true", "16-mixed", "bf16-mixed"]
ImageInput = str | PathLike | Image.Image | np.ndarray | Tensor

# COCO 2017's 80 categories (ids as in instances_*.json): the label table of mmdetection's model-zoo files.
COCO_CATEGORIES = [{"id": i, "name": n} for i, n in [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush")]]


@dataclass
class Prediction(Detections):
    """One image's :class:`Detections` (original image frame) with what a user reads them by.

    ``names[i]`` is the class name of detection ``i``, ``category_ids[i]`` its dataset category id (COCO's
    non-contiguous ids for a COCO model), ``image_size`` the (h, w) of the input and ``source`` its file."""

    names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)
    source: str | None = None

    def above(self, score_thr: float) -> Prediction:
        """The detections scoring at least ``score_thr``."""
        keep = (self.scores >= score_thr).nonzero().flatten()
        idx = keep.tolist()
        return Prediction(self.boxes[keep], self.scores[keep], self.labels[keep],
                          None if self.masks is None else self.masks[keep], [self.names[i] for i in idx],
                          [self.category_ids[i] for i in idx], self.image_size, self.source)


class Predictor:
    """Detections for images, from a checkpoint (see the module docstring).

    Args:
        checkpoint: one of our ``.ckpt`` files (``last.ckpt``, ``best-...ckpt``), or, with ``config``, an
            mmdetection model-zoo ``.pth`` (or any file ``load_from`` reads).
        config: the YAML (``htc-lightning`` config) whose ``model`` and ``data`` sections describe the detector
            and its test-time resize; needed only for a checkpoint without our hyper-parameters.
        categories: the label table ``[{"id", "name"}]`` in label order; default: the checkpoint's, else COCO's.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        precision: ``"32"`` (fp32), ``"16-mixed"`` (fp16 autocast) or ``"bf16-mixed"`` (bf16 autocast), as the
            Trainer's flag.
        batch_size: images per forward pass when given a list.
        checkpoint_format: ``"v2"`` (mmdet 2.x/3.x files) or ``"v1"`` (mmdet 1.x), for zoo files.
    """

    def __init__(self, checkpoint: str | PathLike, config: str | PathLike | None = None, *,
                 categories: Sequence[dict] | None = None, device: str | torch.device = "cpu",
                 precision: Precision = "32", batch_size: int = 1,
                 checkpoint_format: Literal["v2", "v1"] = "v2") -> None:
        if precision not in ("32", "32-true", "16-mixed", "bf16-mixed"):
            raise ValueError(f"precision {precision!r}: expected '32', '16-mixed' or 'bf16-mixed'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        self.device = torch.device(device)
        self.precision = precision
        self.batch_size = batch_size
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ours = isinstance(saved, dict) and "detector" in saved.get("hyper_parameters", {})
        if ours:
            self.categories = _categories(categories or saved.get("categories"), path)
            # the detector as saved, in today's arguments (checkpoints/upgrade.py)
            self.module = DetectionModule.load_from_checkpoint(
                path, map_location="cpu", detector=detector_config(saved["hyper_parameters"]))
            datamodule = _datamodule(saved.get("datamodule_hyper_parameters") or {}, self.categories)
        elif config is None:
            raise ValueError(f"{path} holds no detector description (not a checkpoint of htc-lightning's CLI, e.g. "
                             "an mmdetection model-zoo file): pass the config it was trained with, "
                             "Predictor(checkpoint, config='configs/htc/htc_r50_fpn_1x_coco.yaml')")
        else:
            self.categories = _categories(categories or saved.get("categories") or COCO_CATEGORIES, path)
            self.module, datamodule = build_from_config(Path(config), self.categories)
            from .checkpoints.mmdet import load_weights

            self.load_report = load_weights(self.module.detector, path, checkpoint_format, allow_new_classes=False)
        del saved
        self.module.eval().to(self.device)
        self.datamodule = datamodule
        self.transform, self.collate = datamodule.eval_pipeline()
        self.class_names = [c["name"] for c in self.categories]
        num_classes = self.module.detector.num_classes
        if self.module.detector.roi_head is not None and num_classes != len(self.categories):
            raise ValueError(f"the detector of {path} has {num_classes} classes but {len(self.categories)} "
                             "categories were given: pass the label table it was trained with (categories=...)")

    # -- running -------------------------------------------------------------------------------------------

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """Detections of one image (-> a :class:`Prediction`) or of a list, a folder or a (B, 3, H, W) tensor
        (-> a list), in each image's original frame."""
        single = not _is_many(images)
        whole = single or isinstance(images, str | PathLike | Tensor)  # a folder or a 4-D tensor: one item
        items = _expand([images] if whole else list(images))
        results: list[Prediction] = []
        for start in range(0, len(items), self.batch_size):
            results += self._predict_batch(items[start:start + self.batch_size])
        return results[0] if single else results

    @torch.inference_mode()
    def _predict_batch(self, items: list[tuple[Tensor, str | None]]) -> list[Prediction]:
        samples = []
        for index, (image, source) in enumerate(items):
            meta = {"image_id": index, "orig_size": tuple(int(s) for s in image.shape[-2:])}
            if source is not None:
                meta["file_name"] = Path(source).name
            samples.append(self.transform(image, {"meta": meta}))
        images, targets = self.collate(samples)
        with self._autocast():
            detections, metas = self.module.predict_batch((images.to(self.device), targets))
        return [self._result(det, meta, source) for det, meta, (_, source) in zip(detections, metas, items)]

    def _autocast(self):
        if self.precision in ("32", "32-true"):
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "16-mixed" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _result(self, det: Detections, meta: dict, source: str | None) -> Prediction:
        det = det.to("cpu")
        labels = det.labels.long()
        names = [self.class_names[i] for i in labels.tolist()]
        ids = [int(self.categories[i]["id"]) for i in labels.tolist()]
        masks = None if det.masks is None else det.masks.bool()
        return Prediction(det.boxes.float(), det.scores.float(), labels, masks, names, ids,
                          tuple(meta["orig_size"]), source)

    # -- export --------------------------------------------------------------------------------------------

    def export(self, out: str | PathLike, format: Literal["onnx", "torch.export"] = "onnx",
               size: Sequence[int] | None = None, check_images: Sequence[str | PathLike] | None = None) -> dict:
        """``htc-lightning export`` from Python: writes the inference graph to ``out`` and checks it against
        eager inference on ``check_images`` (default: the photographs the command uses; ``[]`` skips the check).
        ``size`` is (H, W) of the traced example and the check images' resize bound (default: the test scale)."""
        from .export import DEFAULT_CHECK_IMAGES, export_detector, image_files

        if size is None:
            scale = self.datamodule.test_scale
            size = (min(scale), max(scale))
        if check_images is None:
            check_images = [DEFAULT_CHECK_IMAGES] if DEFAULT_CHECK_IMAGES.is_dir() else []
        files = image_files(check_images) if check_images else []
        report = export_detector(self.module.detector, format, size, out, files, self.datamodule.mean,
                                 self.datamodule.std, self.categories)
        self.module.to(self.device)  # export runs on the CPU
        return report

    # -- drawing -------------------------------------------------------------------------------------------

    def draw(self, image: ImageInput, prediction: Prediction | None = None, score_thr: float = 0.3) -> Image.Image:
        """``image`` with its detections (computed now unless given) drawn: masks, boxes, names and scores."""
        from .visualize import draw_detections

        if prediction is None:
            prediction = self(image)
        (pixels, _), = _expand([image])
        picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        return draw_detections(picture, prediction, class_names=self.class_names, score_thr=score_thr)


# -- inputs ------------------------------------------------------------------------------------------------

def _is_many(images: Any) -> bool:
    if isinstance(images, str | PathLike):
        return Path(images).is_dir()
    if isinstance(images, Tensor):
        return images.dim() == 4
    return isinstance(images, list | tuple)


def _expand(items: list) -> list[tuple[Tensor, str | None]]:
    """Every input as a uint8 (3, H, W) RGB tensor and its file (folders and 4-D tensors unrolled)."""
    out: list[tuple[Tensor, str | None]] = []
    for item in items:
        if isinstance(item, str | PathLike):
            path = Path(item)
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                if not files:
                    raise FileNotFoundError(f"folder {path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
                out += [(load_rgb(p), str(p)) for p in files]
            elif not path.is_file():
                raise FileNotFoundError(f"image {path} does not exist")
            else:
                out.append((load_rgb(path), str(path)))
        elif isinstance(item, Image.Image):
            out.append((torch.from_numpy(np.array(item.convert("RGB"))).permute(2, 0, 1), None))
        elif isinstance(item, np.ndarray):
            out.append((_from_array(torch.from_numpy(np.ascontiguousarray(item)), channels_last=True), None))
        elif isinstance(item, Tensor):
            batch = item if item.dim() == 4 else item.unsqueeze(0)
            out += [(_from_array(t.detach().cpu(), channels_last=False), None) for t in batch]
        else:
            raise TypeError(f"cannot predict on a {type(item).__name__}: pass a file path, a folder, a PIL image, an "
                            "(H, W, 3) uint8 array or a (3, H, W) tensor")
    return out


def _from_array(array: Tensor, channels_last: bool) -> Tensor:
    """(H, W, 3) arrays / (3, H, W) tensors -> uint8 (3, H, W); floats are read as 0..1 (torchvision's
    convention), grey images (H, W) get three channels."""
    if array.dim() == 2:
        array = array.unsqueeze(-1 if channels_last else 0)
    if channels_last:
        array = array.permute(2, 0, 1)
    if array.dim() != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"an image must be (3, H, W) (tensors) or (H, W, 3) (arrays), got shape "
                         f"{tuple(array.shape)}")
    if array.is_floating_point():
        if float(array.max()) > 1.0 + 1e-6:
            raise ValueError("a float image must hold values in [0, 1] (torchvision's convention); pass uint8 "
                             "for 0..255 pixels")
        array = (array * 255).round()
    return array.to(torch.uint8).expand(3, -1, -1).contiguous()


# -- the model and its pipeline ----------------------------------------------------------------------------

def _categories(categories: Sequence[dict] | None, path: Path) -> list[dict]:
    if not categories:
        raise ValueError(f"{path} stores no categories (trained before they were saved?): pass "
                         "Predictor(..., categories=[{'id': 1, 'name': 'person'}, ...]) in label order")
    return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories]


def _datamodule(hparams: dict, categories: list[dict]) -> CocoDataModule:
    """The datamodule of the training run, holding its test scale and normalisation (no file is read)."""
    init = {k: v for k, v in hparams.items() if not k.startswith("_")}
    cls = CocoDataModule
    if "_class_path" in hparams:
        module, _, name = hparams["_class_path"].rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            cls = getattr(importlib.import_module(module), name)
    if not hasattr(cls, "eval_pipeline"):
        # another datamodule: its resize settings, read by CocoDataModule's names, give the same pipeline
        cls = CocoDataModule
        keys = ("test_scale", "mean", "std", "size_divisor")
        init = {k: init[k] for k in keys if k in init}
    init.update(data_root=init.get("data_root", "."), categories=categories)
    return cls(**init)


def build_from_config(config: str | Path, categories: list[dict] = COCO_CATEGORIES
                      ) -> tuple[DetectionModule, CocoDataModule]:
    """The module (random weights; the backbone's ImageNet weights are not fetched) and the datamodule a YAML
    config describes, for ``len(categories)`` classes, without reading any data."""
    from pytorch_lightning.cli import instantiate_module

    config = Path(config)

    if not config.is_file():
        raise FileNotFoundError(f"config {config} does not exist")
    parsed = yaml.safe_load(config.read_text()) or {}
    model = parsed.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{config} has no 'model: {{class_path: ..., init_args: ...}}' section")
    init = dict(model.get("init_args") or {})
    init["load_from"] = None  # the weights are the checkpoint's
    detector = init.get("detector") or {}
    detector.setdefault("init_args", {})["num_classes"] = len(categories)
    backbone = detector["init_args"].get("backbone") or {}
    if "pretrained" in (backbone.get("init_args") or {}):
        backbone["init_args"]["pretrained"] = False  # the weights come from elsewhere: no download
    module = instantiate_module(DetectionModule, {"_class_path": model["class_path"], **init})
    data = parsed.get("data") or {}
    data_hparams = dict(data.get("init_args") or {})
    if "class_path" in data:
        data_hparams["_class_path"] = data["class_path"]
    return module, _datamodule(data_hparams, categories)
