"""CocoDataModule: COCO-format folders -> padded batches in the format of ``htc_lightning.structures``."""
from __future__ import annotations

import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .._lightning_compat import uses_distributed_sampler
from .coco import CocoDetection, ImageFolder, load_json
from .images import problem_report
from .samplers import GroupedBatchSampler, repeat_factors
from .transforms import IMAGENET_MEAN, IMAGENET_STD, DetectionCollate, DetectionTransform


class CocoDataModule(pl.LightningDataModule):
    """COCO 2017 (or any folder laid out like it) for training, validation, test and prediction.

    Args:
        data_root: the dataset folder; the other paths are relative to it (absolute paths work too).
        train_ann, train_images, val_ann, val_images: annotation json and image folder per split.
        test_ann, test_images: default to the val ones.
        predict_images: an image file or a folder of images for ``predict`` (targets carry only ``meta``;
            ``image_id`` is COCO's when the file names are COCO ids, else the position: see ``ImageFolder``).
        stuff_maps: folder of COCO-Stuff ``stuffthingmaps`` with one sub-folder per image folder name
            (e.g. ``"stuffthingmaps"`` -> ``stuffthingmaps/train2017``); training targets then carry
            ``semantic`` for HTC's semantic branch. A missing folder or map is an error at ``setup("fit")``;
            validate/test/predict never read the maps.
        train_scales: (long, short) edge pairs, one picked at random per training image.
        train_short_range, train_max_long: the 2018 entry's multi-scale training (short edge uniform in
            the range, long edge at most ``train_max_long``); overrides ``train_scales``.
        test_scale: (long, short) for validation/test/predict.
        flip_prob: horizontal flip probability in training.
        size_divisor: batches are padded to a multiple of it (32 for FPN's five levels).
        mean, std: RGB normalisation on 0..255 pixels (mmdet's ImageNet values).
        batch_size, val_batch_size: images per batch and rank.
        num_workers: DataLoader worker processes.
        missing_images: an image listed but absent is an ``"error"`` at setup, or ``"skip"`` (a warning).
        bad_images: an image file that cannot be decoded or is not of its annotated size is an ``"error"``
            naming it, or with ``"skip"`` is replaced by another sample (deterministically) and reported once
            per rank; training logs ``train/skipped_images`` (per epoch, all ranks).
        check_images: at setup, read every image's header (size, mode, EXIF orientation, end marker; threads,
            the files shared across ranks) and report all bad files at once: an error with
            ``bad_images="error"``, else a warning, and they are replaced without being read.
        group_by_aspect_ratio: training batches hold only landscape or only portrait images.
        categories: the label table (``[{"id": ..., "name": ...}, ...]`` in label order), e.g. from a
            checkpoint (the CLI fills it from ``--ckpt_path``): then no annotation file is needed (``predict``),
            and one that is present must list the same categories.
        seed: shuffling seed (epoch ``e`` uses ``seed + e``); each training sample's augmentation (scale,
            flip) is drawn from a seed of (seed, epoch, index), so it does not depend on workers or resumes.
        filter_empty_gt: leave training images without a (non-crowd) object out (mmdet's default); ``False``
            trains on them too, as background-only images.
        repeat_factor_threshold: repeat-factor sampling for long-tailed data (LVIS: ``0.001``): a training image
            of a category present in a fraction ``f < threshold`` of the images is seen ``sqrt(threshold / f)``
            times per epoch on average (see ``data/samplers.py``); ``None`` samples every image once.

    Distributed training: the train batch sampler shards by rank itself, so the Trainer must not inject a
    ``DistributedSampler`` (``Trainer(use_distributed_sampler=False)``); evaluation loaders are sharded
    with ``DistributedSampler`` here (its padding repeats a few images; the evaluator keeps one copy).
    """

    def __init__(self, data_root: str, train_ann: str = "annotations/instances_train2017.json",
                 train_images: str = "train2017", val_ann: str = "annotations/instances_val2017.json",
                 val_images: str = "val2017", test_ann: str | None = None, test_images: str | None = None,
                 predict_images: str | None = None, stuff_maps: str | None = None,
                 train_scales: list[tuple[int, int]] = [(1333, 800)],  # noqa: B006 (shown in --print_config)
                 train_short_range: tuple[int, int] | None = None, train_max_long: int = 1600,
                 test_scale: tuple[int, int] = (1333, 800), flip_prob: float = 0.5, size_divisor: int = 32,
                 mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD,
                 batch_size: int = 2, val_batch_size: int = 1, num_workers: int = 2,
                 missing_images: Literal["error", "skip"] = "error", group_by_aspect_ratio: bool = True,
                 seed: int = 0, categories: list[dict] | None = None,
                 bad_images: Literal["error", "skip"] = "error", check_images: bool = False,
                 filter_empty_gt: bool = True, repeat_factor_threshold: float | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.data_root = Path(data_root)
        self.train_ann, self.train_images = train_ann, train_images
        self.val_ann, self.val_images = val_ann, val_images
        self.test_ann, self.test_images = test_ann, test_images
        self.predict_images = predict_images
        self.stuff_maps = stuff_maps
        self.train_scales = [tuple(s) for s in train_scales]
        self.train_short_range = tuple(train_short_range) if train_short_range is not None else None
        self.train_max_long = train_max_long
        self.test_scale = tuple(test_scale)
        self.flip_prob = flip_prob
        self.size_divisor = size_divisor
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers = num_workers
        self.missing_images = missing_images
        self.bad_images, self.check_images = bad_images, check_images
        self._reported_bad: set[str] = set()  # skipped files already reported by this rank
        self.group_by_aspect_ratio = group_by_aspect_ratio
        self.seed = seed
        self.filter_empty_gt = filter_empty_gt
        self.repeat_factor_threshold = repeat_factor_threshold
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None
        self.test_dataset: CocoDetection | None = None
        self.predict_dataset: ImageFolder | None = None
        self.train_sampler: GroupedBatchSampler | None = None
        self._given_categories = None if categories is None else [
            {"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories]
        self._categories: list[dict] | None = None

    # -- paths and categories ----------------------------------------------------------------------------

    def _path(self, relative: str) -> Path:
        return (self.data_root / relative).resolve()

    @property
    def val_ann_file(self) -> str:
        return str(self._path(self.val_ann))

    @property
    def test_ann_file(self) -> str:
        return str(self._path(self.test_ann if self.test_ann is not None else self.val_ann))

    @property
    def has_semantic(self) -> bool:
        return self.stuff_maps is not None

    def _category_list(self) -> list[dict]:
        # The (small) val file is enough: the CLI asks for num_classes before any setup.
        if self._categories is None:
            for ann in (self.val_ann, self.test_ann, self.train_ann):
                if ann is not None and self._path(ann).is_file():
                    found = sorted(load_json(self._path(ann)).get("categories", []), key=lambda c: c["id"])
                    if self._given_categories is not None:
                        _check_same_categories(self._given_categories, found, self._path(ann))
                    self._categories = found
                    break
            else:
                if self._given_categories is None:
                    raise FileNotFoundError(f"no annotation file found under {self.data_root} "
                                            f"({self.val_ann}, {self.train_ann}) to read the categories from")
                self._categories = self._given_categories
        return self._categories

    @property
    def categories(self) -> list[dict]:
        """``[{"id", "name"}]`` in label order: what a checkpoint stores so that it can predict on its own."""
        return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in self._category_list()]

    @property
    def cat_ids(self) -> list[int]:
        """Sorted COCO category ids; contiguous label ``i`` is ``cat_ids[i]``."""
        return [c["id"] for c in self._category_list()]

    @property
    def class_names(self) -> list[str]:
        return [c.get("name", str(c["id"])) for c in self._category_list()]

    @property
    def num_classes(self) -> int:
        return len(self._category_list())

    # -- datasets ----------------------------------------------------------------------------------------

    def _stuff_dir(self, images: str) -> Path | None:
        return self._path(self.stuff_maps) / Path(images).name if self.stuff_maps is not None else None

    def _eval_transform(self) -> DetectionTransform:
        return DetectionTransform([self.test_scale], flip_prob=0.0, mean=self.mean, std=self.std)

    def eval_pipeline(self) -> tuple[DetectionTransform, DetectionCollate]:
        """The test-time transform and collate of validation, test and predict, for callers that bring their
        own images (:class:`htc_lightning.predictor.Predictor`), so they see exactly what ``predict`` sees."""
        return self._eval_transform(), DetectionCollate(self.size_divisor)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_dataset is None:
            transform = DetectionTransform(self.train_scales, self.train_short_range, self.train_max_long,
                                           self.flip_prob, self.mean, self.std)
            self.train_dataset = CocoDetection(self._path(self.train_ann), self._path(self.train_images), transform,
                                               self._stuff_dir(self.train_images), train=True,
                                               missing_images=self.missing_images, cat_ids=self.cat_ids,
                                               bad_images=self.bad_images, filter_empty_gt=self.filter_empty_gt)
            if len(self.train_dataset) == 0:
                raise ValueError(f"no training image in {self.train_dataset.ann_file} has a usable (non-crowd) "
                                 f"annotation and an image file in {self.train_dataset.image_dir}")
            self._check(self.train_dataset)
        if stage in ("fit", "validate", None) and self.val_dataset is None:
            # no stuff maps: evaluation only predicts, and the semantic branch's loss is a training term
            self.val_dataset = CocoDetection(self._path(self.val_ann), self._path(self.val_images),
                                             self._eval_transform(),
                                             missing_images=self.missing_images, cat_ids=self.cat_ids,
                                             bad_images=self.bad_images)
            trainer = self.trainer
            if self.val_dataset.num_annotations == 0 and (trainer is None or trainer.limit_val_batches != 0):
                raise ValueError(f"{self.val_dataset.ann_file} has no annotations, so validation would score every "
                                 "metric -1: point val_ann at a json with ground truth, or turn validation off "
                                 "(--trainer.limit_val_batches 0)")
            self._check(self.val_dataset)
        if stage in ("test", None) and self.test_dataset is None:
            self.test_dataset = CocoDetection(self.test_ann_file, self._path(self.test_images or self.val_images),
                                              self._eval_transform(), missing_images=self.missing_images,
                                              cat_ids=self.cat_ids, bad_images=self.bad_images)
            self._check(self.test_dataset)
        if stage == "predict" and self.predict_dataset is None:
            if self.predict_images is None:
                raise ValueError("predict needs CocoDataModule(predict_images=<an image file or a folder of images>): "
                                 "--data.init_args.predict_images PATH")
            self.predict_dataset = ImageFolder(self._path(self.predict_images), self._eval_transform())

    def _check(self, dataset: CocoDetection) -> None:
        """``check_images``: every bad file of ``dataset`` in one report, before any training step. Under DDP
        each rank reads its share of the headers and all ranks get the whole list."""
        if not self.check_images:
            return
        initialised = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if initialised else (1, 0)
        problems = dataset.check_images(rank=rank, world_size=world)
        if world > 1:
            shares: list = [None] * world
            dist.all_gather_object(shares, problems)
            problems = [p for share in shares for p in share]
        if not problems:
            return
        report = problem_report(problems, dataset.ann_file, len(dataset))
        if dataset.bad_images == "error":
            raise ValueError(f"{report}\nFix or remove these files, or set --data.init_args.bad_images skip to "
                             "train without them (each sample is then replaced by another)")
        dataset.bad_indices = {p.index for p in problems}
        warnings.warn(f"{report}\nbad_images=skip: these samples are replaced by others", stacklevel=2)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Reports each image skipped by ``bad_images="skip"`` once on this rank (the workers that found them
        cannot tell each other)."""
        targets = batch[1] if isinstance(batch, tuple | list) and len(batch) == 2 else ()
        for target in targets:
            meta = target.get("meta", {}) if isinstance(target, dict) else {}
            for path, reason in meta.get("skipped", ()):
                if path not in self._reported_bad:
                    self._reported_bad.add(path)
                    rank = self.trainer.global_rank if self.trainer is not None else 0
                    warnings.warn(f"rank {rank}: skipped bad image {path} ({reason}); its sample was replaced by "
                                  f"{meta.get('file_name')} (bad_images=skip; reported once per rank)", stacklevel=2)
        return batch

    # -- loaders -----------------------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, collate_fn=DetectionCollate(self.size_divisor),
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=sigterm_only_from_parent, **kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        world, rank = self._world()
        trainer = self.trainer
        if world > 1 and trainer is not None and uses_distributed_sampler(trainer):
            raise ValueError("CocoDataModule shards training batches itself (GroupedBatchSampler); create the "
                             "Trainer with use_distributed_sampler=False so Lightning does not replace its sampler")
        dataset = self.train_dataset
        groups = dataset.aspect_groups if self.group_by_aspect_ratio else [0] * len(dataset)
        factors = None
        if self.repeat_factor_threshold is not None:
            factors = repeat_factors(dataset.image_labels, self.repeat_factor_threshold)
        self.train_sampler = GroupedBatchSampler(groups, self.batch_size, shuffle=True, seed=self.seed,
                                                 num_replicas=world, rank=rank, with_seeds=True,
                                                 repeat_factors=factors)
        return self._loader(dataset, batch_sampler=self.train_sampler)

    def _eval_loader(self, dataset) -> DataLoader:
        world, rank = self._world()
        sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        return self._loader(dataset, batch_size=self.val_batch_size, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._eval_loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            self.setup("predict")
        # Lightning shards prediction itself (UnrepeatedDistributedSampler) to track indices.
        return self._loader(self.predict_dataset, batch_size=self.val_batch_size, shuffle=False)


def _check_same_categories(expected: list[dict], found: list[dict], path: Path) -> None:
    ours = [(int(c["id"]), str(c.get("name", c["id"]))) for c in expected]
    theirs = [(int(c["id"]), str(c.get("name", c["id"]))) for c in found]
    if ours != theirs:
        raise ValueError(f"{path} has categories {theirs}, but the model (checkpoint) was trained for {ours}: "
                         "evaluate on data with the same categories, or fine-tune with load_from")


def sigterm_only_from_parent(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ends on a SIGTERM from its main process only.

    A cluster's SIGTERM (SLURM, ``timeout``, Kubernetes) reaches the whole process group. A worker that dies of it
    makes the main process fail on its next batch before it can write its SIGTERM checkpoint, so workers leave that
    signal to the main process, which checkpoints and then shuts them down. But the main process itself stops
    workers with SIGTERM (``multiprocessing``'s exit handler terminates and joins them when a script ends with
    a live iterator): ignoring every SIGTERM made such a script wait forever. The sender's pid tells the two
    apart; Python's signal handlers do not see it, so a thread waits for the signal with ``sigwaitinfo``.
    Without ``sigwaitinfo`` (macOS) the worker keeps the default: SIGTERM ends it.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        # The main process is stopping its workers: end at once. Exit status 0, not death by the signal, which
        # torch's SIGCHLD handler in the main process would report as a failed worker.
        os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()
