"""``predict`` output: COCO-format json (original category ids) and, on request, drawn PNGs."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from ..structures import Detections


class CocoPredictionWriter(BasePredictionWriter):
    """Writes ``{output_dir}/predictions.bbox.json`` (and ``.segm.json`` for mask models) after ``predict``.

    Results use the datamodule's ``cat_ids`` (contiguous label i -> ``cat_ids[i]``), so the files are what
    the COCO server or ``pycocotools.COCO.loadRes`` expects; ``image_id`` is ``meta["image_id"]`` and
    ``file_name`` is recorded in ``{output_dir}/images.json``. Each rank writes its own shard
    (``predictions.rank<r>...``) under DDP.

    Args:
        output_dir: where to write; created if missing.
        draw: also write ``{output_dir}/vis/<file stem>.png`` with masks, boxes and class names drawn.
        score_thr: detections below it are not drawn (the json keeps them all).
        image_root: folder of the predicted images, to draw on the original files (default: the
            datamodule's ``data_root / predict_images``); failing that, the batch tensors are drawn after
            undoing padding, resize and normalisation.
    """

    def __init__(self, output_dir: str = "predictions", draw: bool = False, score_thr: float = 0.3,
                 image_root: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.draw = draw
        self.score_thr = score_thr
        self.image_root = image_root
        self._bbox: list[dict] = []
        self._segm: list[dict] = []
        self._images: list[dict] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bbox, self._segm, self._images = [], [], []

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        from ..evaluation.coco import detections_to_coco

        images, targets = batch
        dm = trainer.datamodule
        cat_ids = getattr(dm, "cat_ids", None)
        detections: list[Detections] = list(prediction)
        if cat_ids is None:
            cat_ids = list(range(1, 1 + max([int(d.labels.max()) + 1 for d in detections if len(d)] + [1])))
        for image, target, det in zip(images, targets, detections):
            meta = target["meta"]
            image_id = int(meta["image_id"])
            with_masks = det.masks is not None
            bbox, segm = detections_to_coco(det, image_id, cat_ids, with_masks)
            self._bbox += bbox
            self._segm += segm
            h, w = meta.get("orig_size", (None, None))
            self._images.append({"id": image_id, "file_name": meta.get("file_name"), "height": h, "width": w})
            if self.draw:
                self._draw(image, meta, det, dm)

    def _draw(self, image: torch.Tensor, meta: dict, det: Detections, dm: Any) -> None:
        from PIL import Image

        from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from ..visualize import draw_detections, tensor_to_pil

        file_name = meta.get("file_name") or f"{int(meta['image_id'])}.png"
        root = self.image_root
        if root is None and getattr(dm, "predict_images", None) is not None:
            root = Path(getattr(dm, "data_root", "")) / dm.predict_images  # CocoDataModule's predict folder
        if root is not None and (Path(root) / file_name).is_file():
            picture = Image.open(Path(root) / file_name).convert("RGB")
        else:
            picture = tensor_to_pil(image, meta, getattr(dm, "mean", IMAGENET_MEAN), getattr(dm, "std", IMAGENET_STD))
        drawn = draw_detections(picture, det.to("cpu"), class_names=getattr(dm, "class_names", None),
                                score_thr=self.score_thr)
        out = self.output_dir / "vis" / (Path(file_name).stem + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        drawn.save(out)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        self._dump(self.output_dir / f"predictions{suffix}.bbox.json", self._bbox)
        if self._segm:
            self._dump(self.output_dir / f"predictions{suffix}.segm.json", self._segm)
        self._dump(self.output_dir / f"images{suffix}.json", self._images)

    @staticmethod
    def _dump(path: Path, obj: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj))
        tmp.replace(path)
