"""COCO box / mask AP and proposal AR as a ``torchmetrics.Metric``.

Predictions are turned into COCO results as soon as they arrive (boxes as xywh float64, masks as compressed
RLE), so a whole validation epoch never keeps a dense mask. The metric's states are flat tensors, one list
each (image ids and sizes, per-image detection counts, boxes, scores, labels, and the RLE strings as uint8
bytes with their lengths), so torchmetrics gathers them across ranks like any other metric's (DDP: every rank
calls :meth:`CocoEvaluator.compute`, a collective). ``compute`` keeps the first copy of each ``image_id``
(``DistributedSampler`` pads the last batch with repeated images), evaluates on rank 0 only and broadcasts the
metric dict, so every rank returns the same numbers; an exception raised while evaluating on rank 0 is
re-raised on every rank instead of leaving the others waiting in the broadcast.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from torchmetrics import Metric

from htc_lightning.structures import Detections, ImageMeta

Backend = Literal["pycocotools", "faster_coco_eval"]

# Order of COCOeval.stats for the bbox / segm iou types (the standard 12-number summary).
DET_STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
                  "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l")
_IOU_TYPES = ("bbox", "segm", "proposal")


def _coco_classes(backend: Backend) -> tuple[type, type]:
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    raise ValueError(f"backend {backend!r}: expected 'pycocotools' or 'faster_coco_eval'")


def metric_names(iou_types: Sequence[str], proposal_nums: Sequence[int] = (100, 300, 1000)) -> list[str]:
    """The keys :meth:`CocoEvaluator.compute` returns for these iou types."""
    names: list[str] = []
    for iou_type in iou_types:
        if iou_type == "proposal":
            names += [f"AR@{n}" for n in proposal_nums]
            names += [f"AR_{size}@{proposal_nums[-1]}" for size in ("s", "m", "l")]
        else:
            names += [f"{iou_type}_{name}" for name in DET_STAT_NAMES]
    return names


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """(N, H, W) binary masks -> COCO compressed RLEs with ``str`` counts (json-ready)."""
    return [_rle(masks.shape[-2:], c) for c in _rle_counts(masks)]


def _rle(size: Sequence[int], counts: bytes) -> dict[str, Any]:
    return {"size": [int(v) for v in size], "counts": counts.decode("ascii")}


def _rle_counts(masks: torch.Tensor) -> list[bytes]:
    """The compressed RLE strings of (N, H, W) binary masks, byte for byte what ``pycocotools.mask.encode``
    gives for the whole masks.

    COCO's RLE runs down the columns, so a mask is zeros up to its first non-empty column and after its last:
    only the changes inside that window are searched (a detection's mask covers its box, a few percent of the
    image), along the rows of the C-ordered array. Encoding the whole image needed a column-major copy of it and
    a scan of every pixel: 87 ms for a COCO image's 100 masks.
    """
    if masks.is_floating_point():
        raise ValueError(f"masks must be bool or integer binary masks, got {masks.dtype} (threshold them first)")
    array = masks.detach().cpu().numpy()
    array = array.view(np.uint8) if array.dtype == np.bool_ else (array != 0).view(np.uint8)
    n, h, w = array.shape
    if n == 0:
        return []
    uncompressed = []
    for mask, used in zip(array, array.any(axis=1)):
        used = np.flatnonzero(used)
        if len(used) == 0:
            uncompressed.append({"size": [h, w], "counts": [h * w]})
            continue
        x0, x1 = int(used[0]), int(used[-1]) + 1
        window = mask[:, x0:x1]
        row, col = np.divmod(np.flatnonzero(window[1:] != window[:-1]), x1 - x0)
        # Where the value changes, as column-major positions in the whole image: inside a column, and where a
        # column starts or ends on a 1. A column ending on 1 followed by one starting on 1 is no change: both go.
        changes = np.concatenate([(col + x0) * h + row + 1, (np.flatnonzero(window[0]) + x0) * h,
                                  (np.flatnonzero(window[-1]) + x0 + 1) * h])
        changes.sort()
        repeated = np.flatnonzero(changes[1:] == changes[:-1])
        if len(repeated):
            changes = np.delete(changes, np.concatenate([repeated, repeated + 1]))
        if len(changes) and changes[-1] == h * w:
            changes = changes[:-1]
        uncompressed.append({"size": [h, w], "counts": np.diff(changes, prepend=0, append=h * w).tolist()})
    # pycocotools compresses the runs as its encode() does
    return [rle["counts"] for rle in mask_util.frPyObjects(uncompressed, h, w)]


class _Columns(NamedTuple):
    """One image's detections as the columns of its COCO results, checked."""

    labels: torch.Tensor                # (N,) int64, contiguous 0..C-1, on the CPU
    xywh: torch.Tensor                  # (N, 4) float64
    scores: torch.Tensor                # (N,) float64
    rle_counts: list[bytes] | None      # compressed RLE of each mask; None without masks
    mask_size: tuple[int, int] | None   # (H, W) of the masks


def _columns(det: Detections, image_id: int, num_classes: int, with_masks: bool,
             orig_size: tuple[int, int] | None = None) -> _Columns:
    """The one conversion of a :class:`Detections` into what COCO's results hold, with the checks that name the
    image: labels outside 0..num_classes-1, missing masks, a mask count or (given ``orig_size``) a mask size that
    does not match."""
    n = len(det)
    labels = det.labels.detach().cpu().long().reshape(-1)
    bad = [label for label in labels.tolist() if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"image {image_id}: labels {sorted(set(bad))} outside 0..{num_classes - 1}")
    # xywh in float64 from the float32 corners, as mmdet's xyxy2xywh does on the numpy values
    boxes = det.boxes.detach().cpu().double().reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    scores = det.scores.detach().cpu().double().reshape(-1)
    if not with_masks or n == 0:
        return _Columns(labels, xywh, scores, None, None)
    if det.masks is None:
        raise ValueError(f"image {image_id}: 'segm' evaluation needs Detections.masks, got None")
    if det.masks.shape[0] != n:
        raise ValueError(f"image {image_id}: {det.masks.shape[0]} masks for {n} boxes")
    mask_size = (int(det.masks.shape[-2]), int(det.masks.shape[-1]))
    if orig_size is not None and mask_size != tuple(orig_size):
        raise ValueError(f"image {image_id}: masks are {mask_size}, expected the original size {tuple(orig_size)}")
    return _Columns(labels, xywh, scores, _rle_counts(det.masks), mask_size)


def coco_results(image_ids: Sequence[int], category_ids: Sequence[int], scores: Sequence[float],
                 boxes: Sequence[Sequence[float]] | None = None,
                 segmentations: Sequence[dict] | None = None) -> list[dict]:
    """COCO result-file records: "bbox" ones from xywh ``boxes``, else "segm" ones from RLE ``segmentations``.

    A "segm" record has no 'bbox' key: pycocotools' loadRes would take the box area instead of the mask area for
    the small/medium/large split (mmdet pops it before evaluating segm for the same reason)."""
    if boxes is not None:
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
                for i, c, b, s in zip(image_ids, category_ids, boxes, scores)]
    return [{"image_id": i, "category_id": c, "segmentation": rle, "score": s}
            for i, c, rle, s in zip(image_ids, category_ids, segmentations, scores)]


def detections_to_coco(det: Detections, image_id: int, cat_ids: Sequence[int],
                       with_masks: bool) -> tuple[list[dict], list[dict]]:
    """One image's detections -> (bbox results, segm results) in COCO's result-file format."""
    columns = _columns(det, image_id, len(cat_ids), with_masks)
    categories = [int(cat_ids[label]) for label in columns.labels.tolist()]
    image_ids, scores = [image_id] * len(categories), columns.scores.tolist()
    bbox = coco_results(image_ids, categories, scores, boxes=columns.xywh.tolist())
    if columns.rle_counts is None:
        return bbox, []
    rles = [_rle(columns.mask_size, c) for c in columns.rle_counts]
    return bbox, coco_results(image_ids, categories, scores, segmentations=rles)


def _counts(values: list) -> dict:
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# The metric's states (flat 1-D tensors, concatenated over updates and ranks) and their dtypes.
_STATES = {"image_ids": torch.int64, "image_sizes": torch.int64, "num_dets": torch.int64,
           "boxes": torch.float64, "scores": torch.float64, "labels": torch.int64,
           "rle_lengths": torch.int64, "rle_bytes": torch.uint8}


class CocoEvaluator(Metric):
    """COCO bbox / segm AP and proposal AR over the images passed to :meth:`update`.

    Args:
        ann_file: COCO instances json of the evaluated split. ``None`` means format-only (e.g. test-dev):
            :meth:`compute` writes the result files and returns ``{}``; ``cat_ids`` and ``outfile_prefix``
            are then required.
        cat_ids: COCO category id of each contiguous label; default: the sorted category ids of ``ann_file``.
        iou_types: any of "bbox", "segm", "proposal". "proposal" is mmdet's class-agnostic recall
            (``useCats=0``, ``maxDets=proposal_nums``) on the boxes.
        backend: "pycocotools" or "faster_coco_eval" (same numbers, the latter much faster).
        proposal_nums: the three maxDets of proposal AR (``AR@100``, ``AR@300``, ``AR@1000``).
        outfile_prefix: when set, :meth:`compute` writes ``{prefix}.bbox.json`` (also for proposals) and
            ``{prefix}.segm.json`` with the original category ids, ready for the COCO test-dev server.
        verbose: print COCO's evaluation log and summary table; it is kept in :attr:`summary` either way.
        classwise: also compute each category's AP (IoU .5:.95) and AP50 per bbox/segm, returned as
            ``{iou_type}_AP_{name}`` / ``{iou_type}_AP50_{name}`` (spaces in names become ``_``; -1 for a category
            without ground truth in the evaluated images), and kept as a table in :attr:`classwise_table`.

    Only the images seen by :meth:`update` are evaluated (``params.imgIds``), including images that got no
    detection, so a partial validation run (``limit_val_batches``) gives the AP of that subset. mmdet's
    CocoMetric instead evaluates every image of the annotation file; over a full split the two agree.
    An ``ann_file`` without annotations is an error (every metric would be -1), or with ``outfile_prefix``
    format-only with a warning (COCO test-dev's image list); repeated image or annotation ids are an error.
    Returned values are COCO's, unrounded: -1 where an entry is undefined (e.g. no small objects); all zeros
    (with a warning) when there is no detection at all. After ``compute``, :attr:`written_files` lists the
    json files it wrote.
    """

    full_state_update = False

    def __init__(self, ann_file: str | None, cat_ids: list[int] | None = None,
                 iou_types: tuple[str, ...] = ("bbox", "segm"), backend: Backend = "pycocotools",
                 proposal_nums: tuple[int, ...] = (100, 300, 1000), outfile_prefix: str | None = None,
                 verbose: bool = False, classwise: bool = False) -> None:
        # no cache: verbose or outfile_prefix set between two compute() calls take effect
        super().__init__(compute_with_cache=False)
        unknown = [t for t in iou_types if t not in _IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types {tuple(iou_types)}: expected a non-empty subset of {_IOU_TYPES}")
        if len(proposal_nums) != 3 or list(proposal_nums) != sorted(set(proposal_nums)):
            raise ValueError(f"proposal_nums {tuple(proposal_nums)}: COCO's summary needs three increasing maxDets")
        if ann_file is None and (cat_ids is None or outfile_prefix is None):
            raise ValueError("ann_file=None (format-only) needs both cat_ids and outfile_prefix")
        _coco_classes(backend)  # fail at construction on a wrong or missing backend
        self.ann_file = ann_file
        self.iou_types = tuple(iou_types)
        self.backend = backend
        self.proposal_nums = tuple(int(n) for n in proposal_nums)
        self.outfile_prefix = outfile_prefix
        self.verbose = verbose
        self.classwise = classwise
        self.classwise_table = ""
        self._cat_ids = None if cat_ids is None else [int(c) for c in cat_ids]
        self._coco_gt = None  # loaded on the evaluating rank at the first compute(), then kept across reset()
        self.summary = ""
        self.written_files: list[str] = []
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @property
    def cat_ids(self) -> list[int]:
        if self._cat_ids is None:
            # Read only the categories here: the full ground truth is loaded lazily, on rank 0.
            with open(self.ann_file) as f:
                self._cat_ids = sorted(int(c["id"]) for c in json.load(f)["categories"])
        return self._cat_ids

    def update(self, detections: Sequence[Detections], metas: Sequence[ImageMeta]) -> None:
        """Store a batch of per-image detections (original image frame), masks RLE-encoded at once."""
        if len(detections) != len(metas):
            raise ValueError(f"update: {len(detections)} detections for {len(metas)} metas")
        with_masks = "segm" in self.iou_types
        for det, meta in zip(detections, metas):
            image_id = int(meta["image_id"])
            columns = _columns(det, image_id, len(self.cat_ids), with_masks, meta.get("orig_size"))
            size = columns.mask_size or tuple(meta.get("orig_size", (0, 0)))
            if columns.rle_counts is not None:
                self._append("rle_lengths", torch.tensor([len(c) for c in columns.rle_counts]))
                self._append("rle_bytes", torch.frombuffer(bytearray(b"".join(columns.rle_counts)), dtype=torch.uint8))
            self._append("image_ids", torch.tensor([image_id]))
            self._append("image_sizes", torch.tensor([int(size[0]), int(size[1])]))
            self._append("num_dets", torch.tensor([len(det)]))
            self._append("boxes", columns.xywh.reshape(-1))
            self._append("scores", columns.scores)
            self._append("labels", columns.labels)

    def _append(self, name: str, value: torch.Tensor) -> None:
        getattr(self, name).append(value.to(device=self.device, dtype=_STATES[name]))

    def sync(self, *args: Any, **kwargs: Any) -> None:
        # A rank that saw no image (or no mask) would contribute torchmetrics' float32 placeholder, which would
        # promote the int64/uint8 states in the concatenation: give it an empty tensor of the right dtype first.
        # (``sync`` is the public entry of torchmetrics' gathering; compute() calls it under DDP.)
        for name, dtype in _STATES.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.empty(0, dtype=dtype, device=self.device)])
        super().sync(*args, **kwargs)

    def _state(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if isinstance(value, list):
            value = torch.cat(value) if value else torch.empty(0, dtype=_STATES[name])
        return value.detach().cpu().to(_STATES[name])

    def _kept(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The evaluated image ids, sorted, with the state index of each one's first copy (``DistributedSampler``
        pads the last batch with repeated images) and the state indices of that copy's detections, in that
        order: sorting by image id makes the result order, hence score ties, independent of how ranks split
        the data."""
        image_ids = self._state("image_ids").numpy()
        starts = np.concatenate([[0], np.cumsum(self._state("num_dets").numpy())])
        ids, first = np.unique(image_ids, return_index=True)
        dets = [np.arange(starts[k], starts[k + 1]) for k in first]
        return ids.tolist(), first, np.concatenate(dets) if dets else np.zeros(0, np.int64)

    def _results(self, iou_type: str, kept: tuple[list[int], np.ndarray, np.ndarray]) -> list[dict]:
        """The kept detections as COCO results: masks for "segm", boxes otherwise. New dicts on every call, as
        loadRes adds keys to those it is given; built one iou type at a time to bound ``compute``'s memory."""
        _, first, dets = kept
        per_image = self._state("num_dets").numpy()[first]
        image_ids = np.repeat(self._state("image_ids").numpy()[first], per_image).tolist()
        categories = np.asarray(self.cat_ids, np.int64)[self._state("labels").numpy()[dets]].tolist()
        scores = self._state("scores").numpy()[dets].tolist()
        if iou_type != "segm":
            boxes = self._state("boxes").view(-1, 4).numpy()[dets].tolist()
            return coco_results(image_ids, categories, scores, boxes=boxes)
        sizes = np.repeat(self._state("image_sizes").view(-1, 2).numpy()[first], per_image, axis=0).tolist()
        ends = np.cumsum(self._state("rle_lengths").numpy())
        starts, ends = (ends - self._state("rle_lengths").numpy())[dets].tolist(), ends[dets].tolist()
        rle_bytes = self._state("rle_bytes").numpy().tobytes()
        rles = [_rle(hw, rle_bytes[b:e]) for hw, b, e in zip(sizes, starts, ends)]
        return coco_results(image_ids, categories, scores, segmentations=rles)

    def per_image_results(self) -> dict[int, tuple[list[dict], list[dict]]]:
        """The (synchronised) states as COCO results per image id, the first copy of each image only."""
        kept = self._kept()
        bbox = self._results("bbox", kept)
        segm = self._results("segm", kept) if "segm" in self.iou_types else []
        per_image, det = {}, 0
        for image_id, n in zip(kept[0], self._state("num_dets").numpy()[kept[1]].tolist()):
            per_image[image_id] = (bbox[det:det + n], segm[det:det + n])
            det += n
        return per_image

    # -- compute -----------------------------------------------------------------------------------------

    def compute(self) -> dict[str, float]:
        """Metrics over every image seen since the last :meth:`reset` (on all ranks; a collective under DDP)."""
        rank, world = _dist_info()  # torchmetrics has synchronised the states across ranks
        outcome: tuple[str, Any] = ("ok", None)
        if rank == 0:
            try:
                outcome = ("ok", self._evaluate())
            except Exception as exc:  # re-raised on every rank below
                outcome = ("error", exc)
        if world > 1:
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]

    def _evaluate(self) -> dict[str, float]:
        kept = self._kept()
        img_ids = kept[0]
        if self.outfile_prefix is not None:
            self._write(kept)
        if self.ann_file is None:
            return {}
        gt = self._ground_truth()
        if not gt.dataset.get("annotations"):
            if self.outfile_prefix is None:
                raise ValueError(f"{self.ann_file} has no annotations (no 'annotations' list, or an empty one), so "
                                 "every COCO metric would be -1: evaluate on a json with ground truth, or give an "
                                 "outfile_prefix to only write the detections (e.g. for COCO test-dev)")
            warnings.warn(f"{self.ann_file} has no annotations: wrote the detections to {self.written_files}, "
                          "computed no metric (format-only, as for COCO test-dev)", stacklevel=3)
            return {}
        missing = sorted(set(img_ids) - set(gt.getImgIds()))
        if missing:
            raise ValueError(f"image ids {missing[:10]} (of {len(missing)}) are not in {self.ann_file}")
        if len(kept[2]) == 0:
            warnings.warn(f"CocoEvaluator: no detections on the {len(img_ids)} evaluated images; returning zeros",
                          stacklevel=3)
            metrics = dict.fromkeys(metric_names(self.iou_types, self.proposal_nums), 0.0)
            if self.classwise:  # the same keys as any other epoch: 0 where there was something to find
                names = {c["id"]: c.get("name", str(c["id"])) for c in gt.loadCats(list(self.cat_ids))}
                table = {names[c]: (0.0, 0.0) if gt.getAnnIds(imgIds=img_ids, catIds=[c], iscrowd=False)
                         else (-1.0, -1.0) for c in self.cat_ids}
                per_class = {t: table for t in self.iou_types if t != "proposal"}
                metrics.update(classwise_metrics(per_class))
                self.classwise_table = classwise_table(per_class)
            return metrics
        metrics: dict[str, float] = {}
        summaries = []
        per_class: dict[str, dict[str, tuple[float, float]]] = {}
        for iou_type in self.iou_types:
            stats, text = self._evaluate_one(gt, iou_type, self._results(iou_type, kept), img_ids, per_class)
            metrics.update(zip(metric_names([iou_type], self.proposal_nums), stats))
            summaries.append(text)
        self.summary = "\n".join(summaries)
        if per_class:
            metrics.update(classwise_metrics(per_class))
            self.classwise_table = classwise_table(per_class)
        if self.verbose:
            print(self.summary)
        return metrics

    def _ground_truth(self):
        if self._coco_gt is None:
            coco_cls, _ = _coco_classes(self.backend)
            with contextlib.redirect_stdout(io.StringIO()):
                gt = coco_cls(self.ann_file)
            for kind in ("images", "annotations"):
                ids = [item.get("id") for item in gt.dataset.get(kind) or []]
                if len(set(ids)) != len(ids):
                    repeated = sorted((i for i, n in _counts(ids).items() if n > 1), key=str)
                    raise ValueError(f"{self.ann_file}: {kind[:-1]} id(s) {repeated[:10]} are used more than once; "
                                     "COCO would merge them: give each its own id")
            self._coco_gt = gt
        return self._coco_gt

    def _evaluate_one(self, gt, iou_type: str, results: list[dict], img_ids: list[int],
                      per_class: dict[str, dict[str, tuple[float, float]]] | None = None) -> tuple[list[float], str]:
        _, eval_cls = _coco_classes(self.backend)
        log = io.StringIO()

        def log_line(*args, **kwargs):
            print(*args, **kwargs, file=log)

        with contextlib.redirect_stdout(log):
            dt = gt.loadRes(results)  # adds id/area/iscrowd keys to the dicts: _results made them for it
            kwargs = {"print_function": log_line} if self.backend == "faster_coco_eval" else {}
            coco_eval = eval_cls(gt, dt, "bbox" if iou_type == "proposal" else iou_type, **kwargs)
            coco_eval.params.imgIds = img_ids
            coco_eval.params.catIds = list(self.cat_ids)
            if iou_type == "proposal":
                # mmdet's CocoMetric 'proposal': class-agnostic matching, recall at the proposal budgets.
                coco_eval.params.useCats = 0
                coco_eval.params.maxDets = list(self.proposal_nums)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats = [float(s) for s in coco_eval.stats[:12]]
        if self.classwise and iou_type != "proposal" and per_class is not None:
            names = {c["id"]: c.get("name", str(c["id"])) for c in gt.loadCats(list(self.cat_ids))}
            per_class[iou_type] = {names[c]: ap for c, ap in zip(self.cat_ids, per_category_ap(coco_eval))}
        if iou_type == "proposal":
            stats = stats[6:12]  # AR at each budget, then AR small/medium/large at the last one
        return stats, log.getvalue()

    def _write(self, kept: tuple[list[int], np.ndarray, np.ndarray]) -> None:
        directory = os.path.dirname(self.outfile_prefix)
        if directory:
            os.makedirs(directory, exist_ok=True)
        files = [(f"{self.outfile_prefix}.bbox.json", "bbox")]
        if "segm" in self.iou_types:
            files.append((f"{self.outfile_prefix}.segm.json", "segm"))
        for path, iou_type in files:
            with open(path, "w") as f:
                json.dump(self._results(iou_type, kept), f)
        self.written_files = [path for path, _ in files]


def per_category_ap(coco_eval) -> list[tuple[float, float]]:
    """(AP over IoU .5:.95, AP at IoU .5) per category of an accumulated COCOeval, in ``params.catIds`` order;
    -1 where a category has no ground truth (COCO's own convention), as mmdet's ``classwise`` reads them."""
    precision = np.asarray(coco_eval.eval["precision"])  # (iou thresholds, recall points, categories, areas, maxDets)
    out = []
    for k in range(precision.shape[2]):
        values = []
        for p in (precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]):  # area "all", the largest maxDets
            p = p[p > -1]
            values.append(float(p.mean()) if p.size else -1.0)
        out.append((values[0], values[1]))
    return out


def metric_key(name: str) -> str:
    """A category name as it appears in a metric key (``traffic light`` -> ``traffic_light``)."""
    return "_".join(str(name).split())


def classwise_metrics(per_class: dict[str, dict[str, tuple[float, float]]]) -> dict[str, float]:
    metrics = {}
    for iou_type, table in per_class.items():
        for name, (ap, ap50) in table.items():
            metrics[f"{iou_type}_AP_{metric_key(name)}"] = ap
            metrics[f"{iou_type}_AP50_{metric_key(name)}"] = ap50
    return metrics


def classwise_table(per_class: dict[str, dict[str, tuple[float, float]]]) -> str:
    """One row per category: AP and AP50 of each iou type ('-' where the category has no ground truth)."""
    iou_types = list(per_class)
    names = list(next(iter(per_class.values())))
    width = max([8] + [len(n) for n in names])
    header = f"{'category':<{width}}" + "".join(f" {t + ' AP':>9} {t + ' AP50':>9}" for t in iou_types)
    rows = [header, "-" * len(header)]
    for name in names:
        cells = []
        for iou_type in iou_types:
            cells += [f"{v:9.3f}" if v >= 0 else f"{'-':>9}" for v in per_class[iou_type][name]]
        rows.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(rows)
