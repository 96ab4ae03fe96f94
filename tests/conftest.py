"""Fakes for the training-system tests: a tiny detector and an in-memory COCO-like datamodule.

The fake detector implements the real ``Detector`` interface (``loss(images, targets)``,
``predict(images, metas)``) with a handful of parameters; it "detects" the ground-truth boxes that the
fake datamodule passes in each meta (``gt_boxes``/``gt_labels``), shifted by a learnable offset, so AP
is meaningful and improves with training. Its RoI head has a ``num_classes`` argument like the real one,
which the CLI fills from the datamodule.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from htc_lightning.models.detector import Detector
from htc_lightning.structures import Detections

FIXTURES = (Path(__file__).parent / "fixtures").resolve()

# Reference tests compare with numbers computed in another process or machine (tests/fixtures: oracle dumps,
# FishNet dumps, layer fixtures made by mmdet); `pytest -m reference` runs them alone, which `make test` does
# under simulated CPUs. So that the marker cannot fall behind, a test fails that loads a fixture file, or uses
# a pytest fixture that loaded one, without the marker.
_running: list[pytest.Item] = []
_reference_fixtures: set[tuple[str, str]] = set()  # (file, name) of pytest fixtures seen loading a fixture file
_torch_load = torch.load


def _require_marker(item: pytest.Item, what: str) -> None:
    if item.get_closest_marker("reference") is None:
        raise AssertionError(f"{item.nodeid} {what}: mark it @pytest.mark.reference")


def _load_checking_marker(f, *args, **kwargs):
    if _running and isinstance(f, str | os.PathLike) and Path(f).resolve().is_relative_to(FIXTURES):
        item = _running[-1]
        names = set(getattr(item, "fixturenames", ()))
        frame = sys._getframe(1)
        while frame is not None:  # the pytest fixture (if any) whose body is loading the file
            if frame.f_code.co_name in names:
                _reference_fixtures.add((str(Path(frame.f_code.co_filename).resolve()), frame.f_code.co_name))
            frame = frame.f_back
        _require_marker(item, f"loads the reference fixture {Path(f).name}")
    return _torch_load(f, *args, **kwargs)


torch.load = _load_checking_marker


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


def pytest_runtest_setup(item):
    # fixtures that load references are defined in test modules: a name is looked up in the test's own file
    here = str(Path(item.path).resolve())
    used = {name for file, name in _reference_fixtures if file == here} & set(getattr(item, "fixturenames", ()))
    if used:
        _require_marker(item, f"uses {sorted(used)}, which loaded a reference fixture")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def device(request) -> str:
    """Reference tests run on every device there is, with the same tolerances."""
    return request.param


class FakeRoIHead(nn.Module):
    def __init__(self, num_classes: int = 80, init_offset: float = 3.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.offset = nn.Parameter(torch.full((4,), float(init_offset)))
        self.cls_logits = nn.Parameter(torch.zeros(num_classes))


class FakeDetector(Detector):
    """A stand-in for the Detector (its interface, none of its parts) that trains in milliseconds.

    Args:
        roi_head: builds the head holding the box offset and class logits, for ``num_classes``.
        num_classes: linked from the data by the CLI, as for the Detector.
        with_mask: predict box-shaped masks.
        nan_at_call: ``loss`` returns NaN for ``loss_bbox`` at this (0-based) call.
    """

    with_mask = True  # a plain attribute here, set per instance (the Detector derives it from its RoI head)
    with_semantic = False

    def __init__(self, roi_head: Callable[[int], FakeRoIHead] = FakeRoIHead, num_classes: int = 80,
                 with_mask: bool = True, nan_at_call: int | None = None) -> None:
        nn.Module.__init__(self)  # none of the Detector's parts
        self.num_classes = num_classes
        self.backbone = nn.Conv2d(3, 2, 3, padding=1)
        self.rpn_head = None
        self.roi_head = roi_head(num_classes)
        self.with_mask = with_mask
        self.nan_at_call = nan_at_call
        self.calls = 0

    def loss(self, images: Tensor, targets: list[dict], metrics: dict[str, Tensor] | None = None
             ) -> dict[str, Tensor]:
        feats = self.backbone(images)
        labels = torch.cat([t["labels"] for t in targets])
        head = self.roi_head
        # torch.rand makes the gradient depend on the global RNG, as RoI sampling does in the real model
        noise = torch.rand(4, device=images.device)
        loss_bbox = (head.offset ** 2).mean() + 0.05 * (head.offset * noise).sum()
        if self.nan_at_call is not None and self.calls == self.nan_at_call:
            loss_bbox = loss_bbox * float("nan")
        self.calls += 1
        logits = head.cls_logits.expand(len(labels), -1)
        loss_cls = nn.functional.cross_entropy(logits, labels)
        if metrics is not None:
            metrics["acc"] = (logits.argmax(1) == labels).float().mean().detach() * 100
        return {"loss_feat": 0.1 * feats.pow(2).mean(), "loss_bbox": loss_bbox, "loss_cls": loss_cls}

    @torch.no_grad()
    def predict(self, images: Tensor, metas: list[dict]) -> list[Detections]:
        out = []
        for meta in metas:
            gt = meta["gt_boxes"].to(images.device).float()
            labels = meta["gt_labels"].to(images.device)
            shift = self.roi_head.offset * gt.new_tensor([-1.0, -1.0, 1.0, 1.0])
            h, w = meta["orig_size"]
            boxes = (gt + shift).clamp(min=0)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(max=w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(max=h)
            probs = self.roi_head.cls_logits.softmax(0)[labels]
            scores = probs * torch.linspace(1.0, 0.5, len(gt), device=gt.device)
            masks = None
            if self.with_mask:
                ys = torch.arange(h, device=gt.device).view(1, h, 1) + 0.5
                xs = torch.arange(w, device=gt.device).view(1, 1, w) + 0.5
                b = boxes.view(-1, 4, 1, 1)
                masks = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
            out.append(Detections(boxes, scores, labels, masks))
        return out


class TinyBatchSampler:
    """Stateful, rank-sharded, per-epoch-shuffled batch sampler (the protocol of the data module's)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip = 0
        self.batches_yielded = 0
        # where Lightning's set_epoch reaches a batch sampler (as GroupedBatchSampler's _EpochHook)
        self.sampler = SimpleNamespace(set_epoch=self.set_epoch)

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        per_rank = order[self.rank::self.num_replicas]
        return [per_rank[i:i + self.batch_size] for i in range(0, len(per_rank), self.batch_size)]

    def __len__(self) -> int:
        return math.ceil(len(range(self.rank, self.num_samples, self.num_replicas)) / self.batch_size)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.batches_yielded = skip
        for batch in self._batches()[skip:]:
            self.batches_yielded += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = int(state["epoch"]), int(state["batches_yielded"])


class TinyDataset(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(samples):
    return torch.stack([s["image"] for s in samples]), [s["target"] for s in samples]


class TinyCocoDataModule(pl.LightningDataModule):
    """Random 64x64 images with 1-3 boxes each, a COCO json for the val split, non-contiguous category ids.

    Args:
        root: folder for the annotation json (created).
        num_train, num_val: images per split.
        batch_size, val_batch_size: per rank.
        image_size: (H, W).
        seed: data seed (images, boxes, shuffling).
    """

    def __init__(self, root: str, num_train: int = 8, num_val: int = 4, batch_size: int = 2,
                 val_batch_size: int = 2, image_size: tuple[int, int] = (64, 64), seed: int = 0) -> None:
        super().__init__()
        self.root = Path(root)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_train, self.num_val, self.image_size, self.seed = num_train, num_val, image_size, seed
        self.cat_ids = [1, 3]
        self.class_names = ["square", "disc"]
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        g = torch.Generator().manual_seed(seed)
        self.train_items = [self._item(i, g) for i in range(num_train)]
        self.val_items = [self._item(1000 + i, g) for i in range(num_val)]
        self.root.mkdir(parents=True, exist_ok=True)
        self.val_ann_file = str(self.root / "val.json")
        self._write_ann(self.val_ann_file, self.val_items)
        self.test_ann_file = self.val_ann_file

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _item(self, image_id: int, g: torch.Generator) -> dict:
        h, w = self.image_size
        n = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = 12 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        boxes = torch.cat([xy, xy + wh], 1).round()
        labels = torch.randint(0, 2, (n,), generator=g)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        meta = {"image_id": image_id, "file_name": f"{image_id:06d}.png", "orig_size": (h, w), "img_size": (h, w),
                "pad_size": (h, w), "scale_factor": (1.0, 1.0), "flip": False, "gt_boxes": boxes, "gt_labels": labels}
        image = torch.rand(3, h, w, generator=g) * 255
        return {"image": image, "target": {"boxes": boxes, "labels": labels, "masks": masks, "meta": meta}}

    def _write_ann(self, path: str, items: list[dict]) -> None:
        h, w = self.image_size
        images, anns = [], []
        for item in items:
            meta = item["target"]["meta"]
            images.append({"id": meta["image_id"], "file_name": meta["file_name"], "height": h, "width": w})
            for box, label in zip(meta["gt_boxes"].tolist(), meta["gt_labels"].tolist()):
                x0, y0, x1, y1 = box
                anns.append({"id": len(anns) + 1, "image_id": meta["image_id"], "category_id": self.cat_ids[label],
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                             "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
        cats = [{"id": c, "name": n} for c, n in zip(self.cat_ids, self.class_names)]
        Path(path).write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = TinyBatchSampler(len(self.train_items), self.batch_size, self.seed, world, rank)
        return DataLoader(TinyDataset(self.train_items), batch_sampler=sampler, collate_fn=collate)

    def _eval_loader(self) -> DataLoader:
        world, rank = self._world()
        dataset = TinyDataset(self.val_items)
        sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        return DataLoader(dataset, batch_size=self.val_batch_size, sampler=sampler, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader()


def fake_cli_config(tmp_path: Path, **trainer) -> str:
    """A CLI config file: DetectionModule around FakeDetector on TinyCocoDataModule, 3 CPU steps; ``trainer``
    overrides."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"), "max_steps": 3,
                    "num_sanity_val_steps": 0, **trainer},
        "model": {"class_path": "htc_lightning.module.DetectionModule",
                  "init_args": {"lr": 0.01, "log_images": 0, "detector": {
                      "class_path": "conftest.FakeDetector",
                      "init_args": {"roi_head": {"class_path": "conftest.FakeRoIHead"}}}}},
        "data": {"class_path": "conftest.TinyCocoDataModule", "init_args": {"root": str(tmp_path / "data")}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


class SigtermAt(pl.Callback):
    """Sends this process SIGTERM after training step ``step`` (a cluster preempting the job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def make_detector(num_classes: int = 2, init_offset: float = 3.0, **kwargs) -> FakeDetector:
    return FakeDetector(partial(FakeRoIHead, init_offset=init_offset), num_classes, **kwargs)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """A small synthetic COCO folder (4 train / 2 val images at 64 px, with stuff maps)."""
    from htc_lightning.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), num_train=4, num_val=2, seed=0, image_size=(64, 64))
