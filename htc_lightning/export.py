"""Export a detector's inference graph (``torch.export`` or ONNX) and check it against eager inference.

The graph takes one normalised image padded to a multiple of 32, of any size, and the image's size before
padding, and returns the kept detections of the resized frame (their number is the graph's own)::

    image (1, 3, H, W) float32, img_size (1, 2) int64 (h, w)
        -> boxes (K, 4) float32, scores (K,), labels (K,) int64 (0..C-1), mask_probs (K, S, S)

Inside the graph: backbone, FPN, proposals (per-level top-k, decode, NMS), the cascade with its per-stage RoIs,
multiclass NMS and the mask heads (each detection's class only). Outside it, one small step that needs the
original image size (``finish``, the same two functions as eager ``predict``): boxes divided by the resize
factor, mask probabilities pasted into the original frame and thresholded at ``mask_thr``. ``export.json``
beside the model records what that step needs (``mask_thr``, the normalisation, the categories).

``htc-lightning export --ckpt_path X.ckpt --format onnx|torch.export [--size H W] --out DIR``
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoints.upgrade import detector_config
from .models.layers.masks import paste_masks
from .models.layers.nms import multiclass_nms
from .models.layers.tracing import nms_keeps_zero_to_all
from .models.roi_heads.cascade import boxes_to_rois
from .structures import Detections, ImageMeta, to_original_frame

FORMATS = ("torch.export", "onnx")
FILE_NAMES = {"torch.export": "model.pt2", "onnx": "model.onnx"}
OUTPUT_NAMES = ["boxes", "scores", "labels", "mask_probs"]
SIZE_DIVISOR = 32


class InferenceGraph(nn.Module):
    """The exported part of ``Detector.predict`` for one image: the model's own modules and functions, called
    as ``predict`` calls them (``refine_and_score``, ``multiclass_nms``, ``mask_probs``)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        head = detector.roi_head
        if head is None or not head.with_mask:
            raise ValueError("export: the detector needs a RoI head with a mask head (HTC, Cascade Mask R-CNN); "
                             f"got roi_head={type(head).__name__}")
        if head.nms_type != "nms":
            raise ValueError(f"export: nms_type {head.nms_type!r} is not exportable (Soft-NMS loops until no box "
                             "is left, a count known only when it runs); set nms_type: nms")
        self.detector = detector.eval()

    def forward(self, image: Tensor, img_size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        det, head = self.detector, self.detector.roi_head
        feats = det.extract_feats(image)
        proposals = det.rpn_head.proposals(det.rpn_head(feats), [img_size], det.rpn_head.test_settings)
        sem = head.semantic(feats)
        semantic_feat = None if sem is None else sem[1]
        scores, boxes = head.refine_and_score(feats, boxes_to_rois([proposals[0][:, :4]]), img_size, semantic_feat)
        boxes, scores, labels, _ = multiclass_nms(boxes, scores[:, :-1], head.score_thr, head.nms_iou,
                                                  head.max_per_img, head.nms_type)
        probs = head.mask_probs(feats, boxes_to_rois([boxes]), semantic_feat, labels)
        return boxes, scores, labels, probs


def finish(outputs: Sequence[Tensor], meta: ImageMeta, mask_thr: float = 0.5) -> Detections:
    """The graph's outputs -> the image's detections in its original frame, as ``CascadeRoIHead.
    postprocess_masks`` makes them: boxes by ``to_original_frame``, masks by ``paste_masks`` at ``orig_size``."""
    boxes, scores, labels, probs = (torch.as_tensor(o) for o in outputs)
    boxes = to_original_frame(boxes.float(), meta)
    h, w = (int(v) for v in meta["orig_size"])
    if boxes.shape[0] == 0:
        masks = torch.zeros(0, h, w, dtype=torch.bool)
    else:
        masks = paste_masks(probs.float(), boxes, h, w, threshold=mask_thr)
    return Detections(boxes, scores.float(), labels.long(), masks)


def padded(size: Sequence[int]) -> tuple[int, int]:
    return tuple(int(math.ceil(int(v) / SIZE_DIVISOR) * SIZE_DIVISOR) for v in size)


def trace(detector: nn.Module, size: Sequence[int] = (800, 1333)) -> torch.export.ExportedProgram:
    """``torch.export`` of the inference graph with the padded image's height and width dynamic (multiples of
    32 from 64 to 4096) and the number of detections data-dependent."""
    graph = InferenceGraph(detector)
    nms_keeps_zero_to_all()
    h, w = padded(size)
    image = torch.zeros(1, 3, h, w)
    img_size = torch.tensor([[int(size[0]), int(size[1])]])
    rows, cols = torch.export.Dim("rows", min=2, max=128), torch.export.Dim("cols", min=2, max=128)
    dynamic = {"image": {2: SIZE_DIVISOR * rows, 3: SIZE_DIVISOR * cols}, "img_size": None}
    with torch.no_grad():
        return torch.export.export(graph, (image, img_size), dynamic_shapes=dynamic, strict=False)


class Runner:
    """Runs an exported file (``model.pt2`` or ``model.onnx``, the latter with onnxruntime on CPU)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            self.module = None
        else:
            self.module = torch.export.load(str(self.path)).module()

    def __call__(self, image: Tensor, img_size: Tensor) -> list[Tensor]:
        if self.module is not None:
            with torch.no_grad():
                return list(self.module(image, img_size))
        feed = {"image": image.numpy(), "img_size": img_size.numpy()}
        return [torch.from_numpy(o) for o in self.session.run(OUTPUT_NAMES, feed)]


def save(detector: nn.Module, fmt: str, out: str | Path, size: Sequence[int] = (800, 1333),
         program: torch.export.ExportedProgram | None = None) -> Path:
    """Trace (unless ``program``, ``trace``'s result, is given) and write ``DIR/model.pt2`` or
    ``DIR/model.onnx``; returns its path. One program may be written in both formats, ``model.pt2`` first,
    but converted to ONNX only once (torch 2.14: a second conversion fails in its decompositions with
    ``PendingUnbackedSymbolNotFound``)."""
    if fmt not in FORMATS:
        raise ValueError(f"export: format {fmt!r} is not one of {FORMATS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    program = program if program is not None else trace(detector, size)
    path = out / FILE_NAMES[fmt]
    if fmt == "torch.export":
        torch.export.save(program, str(path))
    else:
        onnx_program = torch.onnx.export(program, input_names=["image", "img_size"], output_names=OUTPUT_NAMES,
                                         dynamo=True, external_data=False)
        onnx_program.save(str(path))
    return path


@dataclass
class ImageCheck:
    """The exported model vs eager ``predict`` on one image (the eager detections are the reference)."""

    file_name: str
    eager: int
    exported: int
    matched: int
    near_ties: int
    unexplained: int
    box_diff: float      # largest |box difference| of a matched pair over the largest |eager box coordinate|
    min_mask_iou: float  # smallest mask IoU over the matched pairs (1.0 without any)
    loc_margin: float | None = None  # GA-RPN: ``location_filter_margin`` of the image (None without GA-RPN)

    @property
    def ok(self) -> bool:
        return self.unexplained == 0 and self.box_diff <= 1e-3 and self.min_mask_iou >= 0.99

    def __str__(self) -> str:
        text = (f"{self.file_name}: {self.matched}/{self.eager} eager detections matched (exported {self.exported}), "
                f"{self.near_ties} near-ties, {self.unexplained} unexplained; boxes within {self.box_diff:.1e} of "
                f"scale; mask IoU >= {self.min_mask_iou:.4f}")
        if self.loc_margin is not None:
            text += f"; GA-RPN location filter margin {self.loc_margin:.1e}"
            if self.unexplained and self.loc_margin <= LOC_NEAR_TIE:
                text += (" (a location within rounding of loc_filter_thr, decided either way by another runtime, "
                         "changes the proposals: expected of an untrained GA-RPN, whose location prior 0.01 is the "
                         "threshold)")
        return f"{text} -> {'ok' if self.ok else 'FAILED'}"


# GA-RPN's location filter (``sigmoid(loc) >= loc_filter_thr``) as onnxruntime computes it differs from eager at
# locations up to 2.5e-8 from the threshold (measured on the tiny HTC + GA-RPN: its conv logits differ by up to
# 2e-6, times the sigmoid's slope 0.0099 at 0.01, plus its own sigmoid's ~6e-9); 4x that is a near-tie. A flip
# there adds or drops a proposal, which the kept detections cannot show as a near-tie of their own.
LOC_NEAR_TIE = 1e-7


def location_filter_margin(detector: nn.Module, images: Tensor) -> float | None:
    """GA-RPN: the smallest distance of a location probability to ``loc_filter_thr`` in eager inference on
    ``images``; None for a proposal head without a location filter."""
    rpn = detector.rpn_head
    thr = getattr(rpn, "loc_filter_thr", None)
    if thr is None:
        return None
    with torch.no_grad():
        loc_preds = rpn(detector.extract_feats(images))[3]
    return min(float((loc.sigmoid() - thr).abs().min()) for loc in loc_preds)


def load_images(paths: Sequence[str | Path], size: Sequence[int], mean: Sequence[float], std: Sequence[float]
                ) -> list[tuple[Tensor, ImageMeta]]:
    """Each photograph as the data module feeds it to ``predict``: resized to fit ``size`` keeping its aspect
    ratio, normalised, padded to a multiple of 32 (a batch of one)."""
    from .data.coco import load_rgb
    from .data.transforms import DetectionCollate, DetectionTransform

    transform = DetectionTransform([(max(size), min(size))], flip_prob=0.0, mean=mean, std=std)
    collate = DetectionCollate(SIZE_DIVISOR)
    samples = []
    for i, path in enumerate(paths):
        image = load_rgb(Path(path))
        target = {"meta": {"image_id": i, "file_name": Path(path).name, "orig_size": tuple(image.shape[-2:])}}
        images, targets = collate([transform(image, target)])
        samples.append((images, targets[0]["meta"]))
    return samples


def check(detector: nn.Module, runner: Runner, samples: Sequence[tuple[Tensor, ImageMeta]]) -> list[ImageCheck]:
    """The exported model against eager ``Detector.predict`` on each sample: the kept detections one to one up to
    near-ties of the score threshold, the top-k cut and NMS (``tools.compare``), boxes of the matched pairs
    within 1e-3 of the boxes' scale, their masks with IoU >= 0.99. A near-tie upstream of the kept detections
    (GA-RPN's location filter) cannot be told from a fault by them; the report gives its margin."""
    from .tools.compare import compare_kept_sets, mask_iou

    head = detector.roi_head
    results = []
    for images, meta in samples:
        with torch.no_grad():
            ref = detector.predict(images, [meta])[0]
        h, w = (int(v) for v in meta["img_size"])
        ours = finish(runner(images, torch.tensor([[h, w]])), meta, head.mask_thr)
        sets = compare_kept_sets(ref.boxes, ref.scores, ours.boxes, ours.scores, ref.labels, ours.labels,
                                 nms_iou=head.nms_iou, score_thr=head.score_thr, top_k=head.max_per_img)
        scale = float(ref.boxes.abs().max()) if len(ref) else 1.0
        box_diff = max((float((ref.boxes[r] - ours.boxes[o]).abs().max()) / scale for r, o in sets.pairs),
                       default=0.0)
        ious = [mask_iou(ref.masks[r], ours.masks[o]) for r, o in sets.pairs]
        results.append(ImageCheck(str(meta.get("file_name", meta.get("image_id"))), len(ref), len(ours),
                                  sets.matched, sets.near_ties, sets.unexplained, box_diff, min(ious, default=1.0),
                                  location_filter_margin(detector, images)))
    return results


def export_detector(detector: nn.Module, format: str, size: Sequence[int] = (800, 1333), out: str | Path = "export",
                    check_images: Sequence[str | Path] = (), mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, categories: list[dict] | None = None) -> dict:
    """Export ``detector`` (eval mode, CPU) to ``out`` in ``format`` ("torch.export" or "onnx") and check the
    file against eager inference on ``check_images``. Returns the report written to ``out/export.json``;
    raises ``RuntimeError`` naming the image when the check fails (the files stay for inspection)."""
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = tuple(mean or IMAGENET_MEAN)
    std = tuple(std or IMAGENET_STD)
    detector = detector.cpu().eval()
    path = save(detector, format, out, size)
    checks = check(detector, Runner(path), load_images(check_images, size, mean, std)) if check_images else []
    report = {"format": format, "file": path.name, "size": [int(v) for v in size], "inputs": {
        "image": "(1, 3, H, W) float32, RGB normalised by mean/std, zero-padded to multiples of 32",
        "img_size": "(1, 2) int64, (h, w) before padding"}, "outputs": OUTPUT_NAMES,
        "mean": list(mean), "std": list(std), "mask_thr": detector.roi_head.mask_thr, "categories": categories,
        "check": [{**asdict(c), "ok": c.ok} for c in checks]}
    (Path(out) / "export.json").write_text(json.dumps(report, indent=1))
    for c in checks:
        print(c, flush=True)
    failed = [c.file_name for c in checks if not c.ok]
    if failed:
        raise RuntimeError(f"export: {path} differs from eager inference on {failed} (see {Path(out) / 'export.json'})")
    return report


# ---- from a checkpoint, and the ``htc-lightning export`` command ---------------------------------------------
DEFAULT_CHECK_IMAGES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "export_images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def detector_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """The detector of a ``htc-lightning fit`` checkpoint (its ``hyper_parameters["detector"]`` config and its
    weights) and the data module's hyper-parameters stored beside it (normalisation, test scale, categories)."""
    from jsonargparse import ArgumentParser

    from .models.detector import Detector

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export: checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    spec = detector_config(ckpt.get("hyper_parameters") or {})
    if spec is None:
        raise ValueError(f"export: {path} holds no detector config (hyper_parameters['detector'] with a class_path); "
                         "export reads checkpoints written by `htc-lightning fit`")
    state = {k[len("detector."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("detector.")}
    init = spec.setdefault("init_args", {})
    backbone = init.get("backbone") or {}
    if "pretrained" in (backbone.get("init_args") or {}):
        backbone["init_args"]["pretrained"] = False  # the checkpoint has the weights: fetch nothing
    cls_weight = state.get("roi_head.bbox_head.0.fc_cls.weight")
    if cls_weight is not None:
        init["num_classes"] = int(cls_weight.shape[0]) - 1
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Detector, "detector")
    detector = parser.instantiate_classes(parser.parse_object({"detector": spec})).detector
    detector.load_state_dict(state)
    data = ckpt.get("datamodule_hyper_parameters") or {}
    data = data.get("init_args", data) if isinstance(data, dict) else {}
    data = dict(data)
    if ckpt.get("categories"):
        data["categories"] = ckpt["categories"]
    return detector.eval(), data


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named, or found in the folders named (sorted); an error names a path without any."""
    files = []
    for p in map(Path, paths):
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        if not found or not all(f.is_file() for f in found):
            raise FileNotFoundError(f"export: --check_images {p}: no image file there ({'/'.join(IMAGE_SUFFIXES)})")
        files += found
    return files


def main(argv: Sequence[str] | None = None) -> dict:
    """``htc-lightning export``: write the model, then check it against eager inference (non-zero exit if not)."""
    import argparse

    parser = argparse.ArgumentParser(prog="htc-lightning export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by htc-lightning fit")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="the traced example's size and the check images' resize bound (default: the "
                             "checkpoint's test_scale, else 800 1333); any size runs once exported")
    parser.add_argument("--out", required=True, help="folder for the model file and export.json")
    parser.add_argument("--check_images", nargs="*", default=None,
                        help=f"images or folders to check on (default: {DEFAULT_CHECK_IMAGES} when present); "
                             "give none (the bare flag) to skip the check")
    args = parser.parse_args(list(argv) if argv is not None else None)
    detector, data = detector_from_checkpoint(args.ckpt_path)
    size = args.size
    if size is None:
        scale = data.get("test_scale") or (1333, 800)
        size = (min(scale), max(scale))
    if args.check_images is None:
        if not DEFAULT_CHECK_IMAGES.is_dir():
            raise FileNotFoundError(f"export: no default check images at {DEFAULT_CHECK_IMAGES}; pass "
                                    "--check_images FILES_OR_FOLDERS (or the bare flag to skip the check)")
        args.check_images = [DEFAULT_CHECK_IMAGES]
    return export_detector(detector, args.format, size, args.out, image_files(args.check_images),
                           data.get("mean"), data.get("std"), data.get("categories"))
