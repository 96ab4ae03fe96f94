"""Multi-scale + horizontal-flip test-time augmentation of a two-stage detector, as mmdetection 2.x's HTC
``aug_test`` (the COCO 2018 entry tested at five scales, each with and without flip).

One image at a time, for every view (scale x flip):

1. proposals: the RPN's test proposals of each view, mapped back and merged by the proposal generator's
   ``merge_proposals`` (mmdet's ``merge_aug_proposals``: class-agnostic NMS at its test settings);
2. boxes: the merged proposals mapped into each view, run through the cascade (``refine_and_score``),
   mapped back; boxes and class scores averaged over the views (row i is proposal i in every view), then
   the RoI head's own ``postprocess_boxes`` (the NMS and rescale rule of ``predict``);
3. masks: the final boxes mapped into each view, the mask heads' probabilities un-flipped and averaged,
   then the RoI head's ``postprocess_masks`` (rescale and pasting into the original image, as ``predict``).

Frames. mmdet merges in the original image's frame; we merge in the frame of the batch image (the test
scale: ``structures``' resized frame), which is the original frame times the batch's ``scale_factor``.
Averaging is linear and IoU is scale-invariant, so the results are mmdet's up to float rounding, and a view at
the batch's own size maps with a factor of exactly 1: one such view without flip reproduces
``Detector.predict`` bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.transforms import rescale_size
from .models.detector import Detector, proposals_to_detections
from .models.interfaces import AugmentableRoIHead, check_part
from .models.roi_heads.cascade import boxes_to_rois
from .structures import Detections, ImageMeta, require, scale_boxes, scale_factor_of

# The 2018 entry's test scales as (long, short) edges, the datamodule's ``test_scale`` order.
ENTRY2018_SCALES: tuple[tuple[int, int], ...] = ((900, 600), (1200, 800), (1500, 1000), (1800, 1200), (2100, 1400))


@dataclass(frozen=True)
class View:
    """One augmentation of an image. ``factor`` (x, y) maps the reference frame (the batch image's) into this
    view before any flip; ``size`` is the view's (h, w) before padding, whose width mirrors flipped boxes."""

    size: tuple[int, int]
    flip: bool
    factor: tuple[float, float]

    @property
    def is_reference(self) -> bool:
        return not self.flip and self.factor == (1.0, 1.0)


def flip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Mirror xyxy boxes (..., 4 or more columns; extra columns untouched) in an image ``width`` wide:
    x1' = W - x2, x2' = W - x1, in float (mmdet 2.x's ``bbox_flip``, no -1, no rounding)."""
    out = boxes.clone()
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


def boxes_to_view(boxes: Tensor, view: View) -> Tensor:
    """Reference-frame xyxy boxes (..., 4) -> the view's frame: scale, then flip (mmdet's ``bbox_mapping``)."""
    out = scale_boxes(boxes, view.factor)
    return flip_boxes(out, view.size[1]) if view.flip else out


def boxes_from_view(boxes: Tensor, view: View) -> Tensor:
    """The view's xyxy boxes (..., 4) -> reference frame: un-flip, then unscale (``bbox_mapping_back``)."""
    if view.flip:
        boxes = flip_boxes(boxes, view.size[1])
    return scale_boxes(boxes, view.factor, inverse=True)


@dataclass
class ViewRun:
    """What one view computes once and the box and mask steps reuse."""

    feats: list[Tensor]
    semantic_feat: Tensor | None
    proposals: Tensor     # (N, 5) in the reference frame


class TestTimeAugmentation:
    """Args:
        scales: test scales as (long edge, short edge) pairs, the datamodule's ``test_scale`` order (a pair
            whose first edge is the shorter is an error, not silently swapped); each view is resized from the
            original size keeping the ratio (mmcv's ``imrescale``: factor ``min(long / max(h, w), short /
            min(h, w))``, sizes ``int(x * factor + 0.5)``). Default: the COCO 2018 entry's five scales.
        flip: add the horizontally flipped image at every scale.
        size_divisor: views are zero-padded to a multiple of this (the batch's padding).
    """

    __test__ = False  # not a pytest class, whatever its name says

    def __init__(self, scales: Sequence[tuple[int, int]] = ENTRY2018_SCALES, flip: bool = True,
                 size_divisor: int = 32) -> None:
        scales = [tuple(int(v) for v in s) for s in scales]
        if not scales:
            raise ValueError("TestTimeAugmentation: scales is empty")
        bad = [s for s in scales if len(s) != 2 or min(s) <= 0]
        if bad:
            raise ValueError(f"TestTimeAugmentation: scales {bad} are not pairs of positive edge lengths")
        swapped = [s for s in scales if s[0] < s[1]]
        if swapped:
            raise ValueError(f"TestTimeAugmentation: scales {swapped} are (short, long); give (long, short) edges, "
                             "as the datamodule's test_scale, e.g. [1333, 800]")
        if size_divisor < 1:
            raise ValueError(f"TestTimeAugmentation: size_divisor must be >= 1, got {size_divisor}")
        self.scales = scales
        self.flip = flip
        self.size_divisor = size_divisor

    def __repr__(self) -> str:
        return f"TestTimeAugmentation(scales={self.scales}, flip={self.flip}, size_divisor={self.size_divisor})"

    # ---- views ----------------------------------------------------------------------------------------------
    def views(self, meta: ImageMeta) -> list[View]:
        """Scale after scale, each unflipped then flipped (mmdet's ``MultiScaleFlipAug`` order)."""
        why = "TestTimeAugmentation sizes the views from the original image"
        orig_h, orig_w = (int(v) for v in require(meta, "orig_size", why))
        ref_size = tuple(int(v) for v in require(meta, "img_size", why))
        sx, sy = scale_factor_of(meta)
        out = []
        for scale in self.scales:
            size = rescale_size(orig_h, orig_w, scale)
            # view = original * (new / orig) = reference * (new / orig) / scale_factor
            factor = (1.0, 1.0) if size == ref_size else (size[1] / orig_w / sx, size[0] / orig_h / sy)
            for flip in ((False, True) if self.flip else (False,)):
                out.append(View(size, flip, factor))
        return out

    def view_image(self, image: Tensor, meta: ImageMeta, view: View) -> Tensor:
        """(1, 3, H, W) input of ``view`` from one batch image (3, Hp, Wp): the un-padded region resized
        bilinearly (normalising commutes with it), flipped, zero-padded. A reference view is the batch image."""
        if view.is_reference:
            return image[None]
        h, w = (int(v) for v in meta["img_size"])
        x = image[None, :, :h, :w]
        if tuple(view.size) != (h, w):
            x = F.interpolate(x, size=view.size, mode="bilinear", align_corners=False)
        if view.flip:
            x = torch.flip(x, dims=[3])
        d = self.size_divisor
        pad_h, pad_w = -view.size[0] % d, -view.size[1] % d
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x.contiguous()

    # ---- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, detector: Detector, images: Tensor, metas: Sequence[ImageMeta]) -> list[Detections]:
        """Detections in the original frame, one per image of the batch (images go one at a time)."""
        if images.shape[0] != len(metas):
            raise ValueError(f"TestTimeAugmentation.predict: {images.shape[0]} images but {len(metas)} metas")
        return [self.predict_image(detector, images[i], meta) for i, meta in enumerate(metas)]

    @torch.no_grad()
    def predict_image(self, detector: Detector, image: Tensor, meta: ImageMeta) -> Detections:
        """One batch image (3, Hp, Wp) with its meta -> its merged detections in the original frame."""
        if detector.roi_head is not None:
            check_part(detector.roi_head, AugmentableRoIHead, "test-time augmentation: roi_head")
        views = self.views(meta)
        runs = [self.run_view(detector, image, meta, v) for v in views]
        proposals = detector.rpn_head.merge_proposals([r.proposals for r in runs])
        if detector.roi_head is None:
            return proposals_to_detections(proposals, meta)
        return self._detect(detector.roi_head, views, runs, proposals, meta)

    def run_view(self, detector: Detector, image: Tensor, meta: ImageMeta, view: View) -> ViewRun:
        """FPN features, semantic feature and RPN proposals (mapped back to the reference frame) of a view."""
        feats = detector.extract_feats(self.view_image(image, meta, view))
        rpn = detector.rpn_head
        props = rpn.proposals(rpn(feats), [view.size], rpn.test_settings)[0]
        props = torch.cat([boxes_from_view(props[:, :4], view), props[:, 4:]], 1)
        semantic_feat = None
        if detector.roi_head is not None:
            sem = detector.roi_head.semantic(feats)
            semantic_feat = None if sem is None else sem[1]
        return ViewRun(feats, semantic_feat, props)

    def _detect(self, head: AugmentableRoIHead, views: list[View], runs: list[ViewRun], proposals: Tensor,
                meta: ImageMeta) -> Detections:
        proposals = proposals.to(runs[0].feats[0].device)
        if proposals.shape[0] == 0:
            scores, boxes = proposals.new_zeros(0, head.num_classes + 1), proposals.new_zeros(0, 4)
        else:
            all_scores, all_boxes = [], []
            for view, run in zip(views, runs):
                rois = boxes_to_rois([boxes_to_view(proposals[:, :4], view)])
                scores, boxes = head.refine_and_score(run.feats, rois, [view.size], run.semantic_feat)
                all_scores.append(scores)
                all_boxes.append(boxes_from_view(boxes, view))
            scores, boxes = torch.stack(all_scores).mean(0), torch.stack(all_boxes).mean(0)
        dets = head.postprocess_boxes(scores, boxes, meta)
        if not head.with_mask:
            return dets
        probs = None
        if len(dets):
            # mask_probs already merges the stages (mean or last, per mask_merge); with the same number of stages
            # in every view, the mean over views of the stage means is mmdet 2.x's mean over views x stages
            per_view = []
            for view, run in zip(views, runs):
                rois = boxes_to_rois([boxes_to_view(dets.boxes, view)])
                p = head.mask_probs(run.feats, rois, run.semantic_feat, dets.labels)
                per_view.append(p.flip(-1) if view.flip else p)
            probs = torch.stack(per_view).mean(0)
        return head.postprocess_masks(dets, probs, meta)
