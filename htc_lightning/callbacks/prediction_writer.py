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
    """Writes ``predictions.bbox.json`` (and ``.segm.json`` for mask models) and ``images.json`` after ``predict``,
    and prints every path it wrote.

    Results use the datamodule's ``cat_ids`` (contiguous label i -> ``cat_ids[i]``), so the files are what
    the COCO server or ``pycocotools.COCO.loadRes`` expects. ``image_id`` is ``meta["image_id"]`` (COCO's id when
    the file names are COCO ids, else the file's position; see ``ImageFolder``); ``images.json`` maps every id to
    its ``file_name``, ``path`` and size. Each rank writes its own shard (``predictions.rank<r>...``) under DDP.

    Args:
        output_dir: where to write; created if missing. Default: ``predictions/`` in the run's log directory
            (``trainer.log_dir``, e.g. ``<default_root_dir>/lightning_logs/version_<n>/predictions``).
        draw: also write ``<output_dir>/vis/<file stem>.png`` with masks, boxes, class names and scores drawn.
        score_thr: detections below it are not drawn (the json keeps them all); independent of the model's own
            ``score_thr`` (which decides what is detected at all). Lower it for an undertrained model.
        image_root: folder of the predicted images, to draw on the original files (default: each image's
            ``meta["path"]``); failing that, the batch tensors are drawn after undoing padding, resize and
            normalisation.
    """

    def __init__(self, output_dir: str | None = None, draw: bool = False, score_thr: float = 0.3,
                 image_root: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.draw = draw
        self.score_thr = score_thr
        self.image_root = image_root
        self.written: list[Path] = []
        self._bbox: list[dict] = []
        self._segm: list[dict] = []
        self._images: list[dict] = []
        self._drawn = [0, 0]  # detections drawn, detections in drawn images
        self._with_masks = False
        self._out: Path = Path("predictions")

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bbox, self._segm, self._images, self.written, self._drawn = [], [], [], [], [0, 0]
        self._with_masks = False
        if self.output_dir is not None:
            self._out = self.output_dir
        else:
            self._out = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"

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
            self._with_masks |= with_masks
            bbox, segm = detections_to_coco(det, image_id, cat_ids, with_masks)
            self._bbox += bbox
            self._segm += segm
            h, w = meta.get("orig_size", (None, None))
            self._images.append({"id": image_id, "file_name": meta.get("file_name"), "path": meta.get("path"),
                                 "height": h, "width": w})
            if self.draw:
                self._draw(image, meta, det, dm)

    def _draw(self, image: torch.Tensor, meta: dict, det: Detections, dm: Any) -> None:
        from PIL import Image

        from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from ..visualize import draw_detections, tensor_to_pil

        file_name = meta.get("file_name") or f"{int(meta['image_id'])}.png"
        source = Path(self.image_root) / file_name if self.image_root is not None else meta.get("path")
        if source is not None and Path(source).is_file():
            picture = Image.open(source).convert("RGB")
        else:
            picture = tensor_to_pil(image, meta, getattr(dm, "mean", IMAGENET_MEAN), getattr(dm, "std", IMAGENET_STD))
        drawn = draw_detections(picture, det.to("cpu"), class_names=getattr(dm, "class_names", None),
                                score_thr=self.score_thr)
        out = self._out / "vis" / (Path(file_name).stem + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        drawn.save(out)
        self.written.append(out)
        self._drawn[0] += int((det.scores >= self.score_thr).sum())
        self._drawn[1] += len(det)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._out.mkdir(parents=True, exist_ok=True)
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        self._dump(self._out / f"predictions{suffix}.bbox.json", self._bbox)
        if self._with_masks:
            self._dump(self._out / f"predictions{suffix}.segm.json", self._segm)
        self._dump(self._out / f"images{suffix}.json", self._images)
        # every rank prints its own files (under DDP each writes a shard)
        lines = [f"predict: {len(self._images)} image(s), {len(self._bbox)} detection(s); wrote"]
        lines += [f"  {path.resolve()}" for path in self.written]
        if self.draw:
            lines.append(f"  drew {self._drawn[0]} of {self._drawn[1]} detection(s), those scoring >= {self.score_thr} "
                         "(--prediction_writer.score_thr)")
        print("\n".join(lines), flush=True)

    def _dump(self, path: Path, obj: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj))
        tmp.replace(path)
        self.written.append(path)
