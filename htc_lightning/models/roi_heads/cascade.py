"""The cascade RoI head: Cascade Mask R-CNN (Cai & Vasconcelos) with Hybrid Task Cascade's flags (Chen et al.,
CVPR 2019), or with ``num_stages=1`` Mask R-CNN. HTC's ablation ladder is a set of
flags:

    Cascade Mask R-CNN   interleaved=False, mask_info_flow=False, semantic_head=None
    + interleaved        interleaved=True
    + mask info flow     mask_info_flow=True
    + semantic branch    semantic_head=FusedSemanticHead(...)   (= HTC)

Submodule names follow mmdet's ``HybridTaskCascadeRoIHead`` so that its checkpoints load key for key.
"""
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from ...structures import Detections, ImageMeta, to_original_frame
from ..interfaces import FeatureSpec
from ..layers.assigners import MaxIoUAssigner
from ..layers.masks import paste_masks
from ..layers.nms import multiclass_nms
from ..layers.roi_extractor import MultiLevelRoIAlign
from ..layers.samplers import RandomSampler, SamplingResult
from .bbox_head import Shared2FCBBoxHead
from .mask_head import FCNMaskHead
from .semantic_head import FusedSemanticHead

_NMS_TYPES = ("nms", "soft_nms_linear", "soft_nms_gaussian")


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image (N_i, 4+) boxes -> (sum N_i, 5) RoIs whose first column is the image index."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), float(i)), b[:, :4]], 1) for i, b in enumerate(boxes)]
    return torch.cat(rois) if rois else torch.zeros(0, 5)


# The parts a researcher swaps, as factories: the RoI head calls them with its own FeatureSpec (the pyramid's
# width and strides, the class count) and what only it knows per stage, so YAML gives a ``class_path`` and the
# part's own ``init_args`` and never repeats the data's class count or the neck's width.
BBoxHeadFactory = Callable[[FeatureSpec], Shared2FCBBoxHead]
"""``(spec, *, roi_feat_size, target_stds) -> box head`` of one stage."""
MaskHeadFactory = Callable[[FeatureSpec], FCNMaskHead]
"""``(spec, *, with_conv_res) -> mask head`` of one stage."""
SemanticHeadFactory = Callable[[FeatureSpec], FusedSemanticHead]
"""``(spec) -> semantic branch`` over the pyramid."""
AssignerFactory = Callable[[float, float], MaxIoUAssigner]
"""``(pos_iou_thr, neg_iou_thr, *, min_pos_iou) -> assigner`` of one stage (all three are the stage's IoU)."""


class CascadeRoIHead(nn.Module):
    """With its defaults Cascade Mask R-CNN; HTC sets ``interleaved``, ``mask_info_flow`` and ``semantic_head``.

    Args (mmdet's names and defaults; ``htc_r50_fpn_1x_coco`` sets ``score_thr=0.001``):
        input: the pyramid and the class count (the Detector passes them); every part below is built for it.
        num_stages, stage_loss_weights, iou_thresholds, target_stds: one entry per cascade stage (assigner
            IoU for pos = neg = min_pos, box-delta stds, weight on that stage's box and mask losses).
        bbox_head: builds each stage's box head (default ``Shared2FCBBoxHead``; its ``init_args`` set the fc
            width, loss weights, ``reg_class_agnostic``, ``bbox_loss``); called with the stage's ``target_stds``
            and the box RoI extractor's ``roi_feat_size``; ``num_classes`` comes from ``input``.
        mask_head: builds each stage's mask head (default ``FCNMaskHead``), called with
            ``with_conv_res = mask_info_flow and stage > 0``; ``None`` makes a box-only cascade.
        semantic_head: builds the fused semantic branch (HTC Sec. 3.3; its own ``num_classes`` count the stuff
            map's labels); its feature, RoIAligned at ``semantic_stride``,
            is added to the box (avg-pooled to the box RoI size) and/or mask RoI features per ``semantic_fusion``.
        bbox_roi_extractor, mask_roi_extractor: RoIAlign over the pyramid levels; default 7x7 and 14x14 on the
            input's four finest strides, 4-32 for the FPN (mmdet's ``SingleRoIExtractor``).
        assigner: builds each stage's assigner with the stage's IoU threshold (default ``MaxIoUAssigner``; set
            ``match_low_quality``/``ignore_iof_thr`` in its ``init_args``). mmdet's HTC configs leave
            ``match_low_quality`` True, its Cascade Mask R-CNN configs set False; ``ignore_iof_thr`` -1 (mmdet's
            R-CNN configs) does not use crowd boxes in the second stage.
        sampler: the RoI sampler of every stage; default ``RandomSampler(512, 0.25)`` with the gt boxes added
            as proposals (``num: null`` keeps every candidate, as mmdet with a 10**7 budget).
        interleaved: train stage t's mask head on the boxes regressed by box head t, re-assigned and re-sampled
            (HTC Sec. 3.1); otherwise on the positives of the box sample (Cascade Mask R-CNN).
        mask_info_flow: feed mask head t-1's last conv feature into mask head t (HTC Sec. 3.2).
        mask_merge: test-time mask of the cascade: "mean" of the stages' sigmoid maps (mmdet 2.x, the published
            HTC AP; also what mmdet 3.3.0's Cascade Mask R-CNN does) or "last" stage only (mmdet 3.3.0's HTC).
        nms_type: "nms", "soft_nms_linear" or "soft_nms_gaussian" (the COCO 2018 entry used Soft-NMS).
    """

    def __init__(self, input: FeatureSpec, num_stages: int = 3,
                 stage_loss_weights: Sequence[float] = (1, 0.5, 0.25),
                 iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7),
                 target_stds: Sequence[Sequence[float]] = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                                          (0.033, 0.033, 0.067, 0.067)),
                 bbox_head: BBoxHeadFactory = Shared2FCBBoxHead,
                 mask_head: MaskHeadFactory | None = FCNMaskHead,
                 semantic_head: SemanticHeadFactory | None = None,
                 bbox_roi_extractor: MultiLevelRoIAlign | None = None,
                 mask_roi_extractor: MultiLevelRoIAlign | None = None,
                 assigner: AssignerFactory = MaxIoUAssigner, sampler: RandomSampler | None = None,
                 interleaved: bool = False, mask_info_flow: bool = False,
                 semantic_fusion: tuple[str, ...] = ("bbox", "mask"), semantic_stride: int = 8,
                 mask_merge: Literal["mean", "last"] = "mean",
                 score_thr: float = 0.05, nms_iou: float = 0.5, max_per_img: int = 100, mask_thr: float = 0.5,
                 nms_type: str = "nms", soft_nms_sigma: float = 0.5, soft_nms_min_score: float = 1e-3) -> None:
        super().__init__()
        for name, seq in (("stage_loss_weights", stage_loss_weights), ("iou_thresholds", iou_thresholds),
                          ("target_stds", target_stds)):
            if len(seq) != num_stages:
                raise ValueError(f"CascadeRoIHead: {name} has {len(seq)} entries for num_stages={num_stages}")
        with_mask = mask_head is not None
        if mask_info_flow and not with_mask:
            raise ValueError("CascadeRoIHead: mask_info_flow=True needs a mask_head")
        if mask_merge not in ("mean", "last"):
            raise ValueError(f"CascadeRoIHead: mask_merge {mask_merge!r} is not 'mean' or 'last'")
        if nms_type not in _NMS_TYPES:
            raise ValueError(f"CascadeRoIHead: nms_type {nms_type!r} is not one of {_NMS_TYPES}")
        unknown = set(semantic_fusion) - {"bbox", "mask"}
        if unknown:
            raise ValueError(f"CascadeRoIHead: semantic_fusion {tuple(semantic_fusion)} may only hold 'bbox'/'mask'")
        self.num_classes = input.num_classes
        self.num_stages = num_stages
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.with_mask = with_mask
        self.interleaved = interleaved
        self.mask_info_flow = mask_info_flow
        self.semantic_fusion = tuple(semantic_fusion)
        self.mask_merge = mask_merge
        self.score_thr, self.nms_iou, self.max_per_img = score_thr, nms_iou, max_per_img
        self.mask_thr, self.nms_type = mask_thr, nms_type
        self.soft_nms_sigma, self.soft_nms_min_score = soft_nms_sigma, soft_nms_min_score

        roi_strides = input.strides[:4]
        if bbox_roi_extractor is None:
            bbox_roi_extractor = MultiLevelRoIAlign(7, roi_strides)
        self.bbox_roi_extractor = bbox_roi_extractor
        roi_feat_size = self.bbox_roi_extractor.output_size
        self.bbox_head = nn.ModuleList(bbox_head(input, roi_feat_size=roi_feat_size, target_stds=tuple(stds))
                                       for stds in target_stds)
        if with_mask:
            if mask_roi_extractor is None:
                mask_roi_extractor = MultiLevelRoIAlign(14, roi_strides)
            self.mask_roi_extractor = mask_roi_extractor
            # HTC's first mask head has no predecessor, hence no conv_res (mmdet: with_conv_res=False)
            self.mask_head = nn.ModuleList(mask_head(input, with_conv_res=mask_info_flow and t > 0)
                                           for t in range(num_stages))
        self.semantic_head = None if semantic_head is None else semantic_head(input)
        self.with_semantic = self.semantic_head is not None
        if self.with_semantic:
            size = self.mask_roi_extractor.output_size if with_mask else 14
            self.semantic_roi_extractor = MultiLevelRoIAlign(size, (semantic_stride,))
        self.class_sized_parameters = tuple(
            f"{name}.{t}.{p}" for name in ("bbox_head", "mask_head") if hasattr(self, name)
            for t, head in enumerate(getattr(self, name)) for p in head.class_sized_parameters
        ) + tuple(f"semantic_head.{p}" for p in (self.semantic_head.class_sized_parameters
                                                  if self.with_semantic else ()))

        self.assigners = [assigner(t, t, min_pos_iou=t) for t in self.iou_thresholds]
        self.sampler = sampler if sampler is not None else RandomSampler(512, 0.25, add_gt_as_proposals=True)

    # ---- forward pieces -------------------------------------------------------------------------------------
    def semantic(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None:
        """(seg logits, fused semantic feature) at stride 8, or None without a semantic head."""
        if self.semantic_head is None:
            return None
        return self.semantic_head(list(feats))

    def _fuse_semantic(self, roi_feats: Tensor, rois: Tensor, semantic_feat: Tensor | None, branch: str) -> Tensor:
        if self.semantic_head is None or branch not in self.semantic_fusion:
            return roi_feats
        if semantic_feat is None:
            raise ValueError(f"CascadeRoIHead: the {branch} branch fuses the semantic feature; pass semantic_feat "
                             "(the second output of semantic(feats))")
        size, target = self.semantic_roi_extractor.output_size, roi_feats.shape[-1]
        if size % target == 0:
            # the box branch's 7x7 from the 14x14 semantic RoIAlign: pooled inside the RoIAlign
            sem = self.semantic_roi_extractor([semantic_feat], rois, avg_pool=size // target)
        else:
            sem = F.adaptive_avg_pool2d(self.semantic_roi_extractor([semantic_feat], rois), roi_feats.shape[-2:])
        return roi_feats + sem

    def box_stage(self, stage: int, feats: Sequence[Tensor], rois: Tensor,
                  semantic_feat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Box head ``stage`` on ``rois`` (K, 5): (cls_score (K, C + 1) logits, bbox_pred (K, 4) deltas)."""
        x = self.bbox_roi_extractor(feats, rois)
        return self.bbox_head[stage](self._fuse_semantic(x, rois, semantic_feat, "bbox"))

    def _mask_feats(self, feats: Sequence[Tensor], rois: Tensor, semantic_feat: Tensor | None) -> Tensor:
        return self._fuse_semantic(self.mask_roi_extractor(feats, rois), rois, semantic_feat, "mask")

    def mask_stage(self, stage: int, feats: Sequence[Tensor], rois: Tensor,
                   semantic_feat: Tensor | None = None) -> Tensor:
        """Mask logits (K, C, 28, 28) of head ``stage``; with the information flow, heads 0..stage-1 run first
        on the same RoIs and pass their features along, with gradients (HTC trains the chain jointly)."""
        x = self._mask_feats(feats, rois, semantic_feat)
        res = None
        if self.mask_info_flow:
            for i in range(stage):
                _, res = self.mask_head[i](x, res, with_logits=False)
        return self.mask_head[stage](x, res)[0]

    def mask_probs(self, feats: Sequence[Tensor], rois: Tensor, semantic_feat: Tensor | None = None,
                   labels: Tensor | None = None) -> Tensor:
        """Test-time per-class mask probabilities (K, C, 28, 28) merged over stages per ``mask_merge``; with
        ``labels`` (K,) only each RoI's class, (K, 28, 28), which is all a detection needs."""
        x = self._mask_feats(feats, rois, semantic_feat)
        stages = range(self.num_stages)
        if self.mask_merge == "last" and not self.mask_info_flow:
            stages = range(self.num_stages - 1, self.num_stages)
        probs, res = [], None
        for t in stages:
            with_logits = self.mask_merge == "mean" or t == self.num_stages - 1
            logits, feat = self.mask_head[t](x, res, with_logits=with_logits, labels=labels)
            if not with_logits:  # "last" with the information flow: earlier heads only pass their feature on
                res = feat
                continue
            if self.mask_info_flow:
                res = feat
            probs.append(logits.sigmoid())
        return probs[-1] if self.mask_merge == "last" else torch.stack(probs).mean(0)

    # ---- training -------------------------------------------------------------------------------------------
    def _sample(self, stage: int, boxes: Sequence[Tensor], targets: Sequence[dict],
                valid: Sequence[Tensor] | None = None) -> list[SamplingResult]:
        """Assign and sample every image's candidates; ``valid`` flags per image the candidates that take part
        (see ``_refine``). The sample sizes of all images reach the host in one transfer."""
        assigner = self.assigners[stage]
        crowds = [t.get("crowd_boxes") if assigner.ignore_iof_thr > 0 else None for t in targets]
        crowds = [None if c is None or len(c) == 0 else c for c in crowds]
        if all(c is None for c in crowds):
            # all images in one padded assignment: the same results in a fraction of the ops
            assigns = assigner.assign_batch([b[:, :4] for b in boxes], [t["boxes"] for t in targets],
                                            [t["labels"] for t in targets], valid)
        else:
            assigns = [assigner.assign(b[:, :4], t["boxes"], t["labels"], c, None if valid is None else valid[i])
                       for i, (b, t, c) in enumerate(zip(boxes, targets, crowds))]
        sampler = self.sampler
        counts = sampler.candidate_counts(assigns)
        return [sampler.sample(a, b[:, :4], t["boxes"], t["labels"], counts=c)
                for a, b, t, c in zip(assigns, boxes, targets, counts)]

    def _loss_name(self, stage: int, name: str) -> str:
        # mmdet's Mask R-CNN (one stage) names its losses without the stage prefix
        return name if self.num_stages == 1 else f"s{stage}.{name}"

    def loss(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], targets: Sequence[dict],
             metrics: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``proposals``: per image (N, 4 or 5), detached. Returns the losses only, by mmdet's names:
        ``s{t}.loss_cls``, ``s{t}.loss_bbox``, ``s{t}.loss_mask`` (stage weights applied), ``loss_semantic_seg``;
        their sum is the training loss. ``metrics``, when given, receives what is watched but not optimised:
        ``s{t}.acc``, each stage's box classification accuracy in percent (detached)."""
        if len(proposals) != len(targets):
            raise ValueError(f"CascadeRoIHead.loss: {len(proposals)} proposal sets for {len(targets)} images")
        losses: dict[str, Tensor] = {}
        img_sizes = [tuple(t["meta"]["img_size"]) for t in targets]
        semantic_feat = None
        if self.semantic_head is not None:
            missing = [i for i, t in enumerate(targets) if t.get("semantic") is None]
            if missing:
                raise ValueError(f"CascadeRoIHead.loss: images {missing} have no 'semantic' map, which the semantic "
                                 "head needs (load the COCO-Stuff stuffthingmaps or drop semantic_head)")
            with record_function("semantic_head"):
                seg_pred, semantic_feat = self.semantic_head(list(feats))
                labels = torch.stack([t["semantic"] for t in targets])
                losses["loss_semantic_seg"] = self.semantic_head.loss(seg_pred, labels)

        boxes = [p[:, :4].detach() for p in proposals]
        valid = None
        for t in range(self.num_stages):
            weight = self.stage_loss_weights[t]
            with torch.no_grad(), record_function("assign_sample"):
                samples = self._sample(t, boxes, targets, valid)
            rois = boxes_to_rois([s.boxes for s in samples])
            with record_function(f"box_stage{t}"):
                cls_score, bbox_pred = self.box_stage(t, feats, rois, semantic_feat)
                head = self.bbox_head[t]
                box_targets = head.targets(samples)
                for name, value in head.loss(cls_score, bbox_pred, *box_targets).items():
                    losses[self._loss_name(t, name)] = value * weight
                if metrics is not None:
                    metrics[self._loss_name(t, "acc")] = head.accuracy(cls_score, box_targets[0])
            refined = None
            if self.interleaved or t < self.num_stages - 1:
                with torch.no_grad():
                    # a class-specific regressor refines with the gt class, else the predicted one (mmdet)
                    labels = box_targets[0]
                    labels = torch.where(labels == self.num_classes, cls_score[:, :-1].argmax(1), labels)
                    refined = self._refine(t, rois, bbox_pred, labels, samples, img_sizes)
            if self.with_mask:
                mask_samples = samples
                if self.interleaved:
                    # HTC Sec. 3.1: the mask branch learns from the boxes this stage just regressed
                    with torch.no_grad(), record_function("assign_sample"):
                        mask_samples = self._sample(t, refined[0], targets, refined[1])
                pos_rois = boxes_to_rois([s.pos_boxes for s in mask_samples])
                with record_function(f"mask_stage{t}"):
                    logits = self.mask_stage(t, feats, pos_rois, semantic_feat)
                    loss_mask = self.mask_head[t].loss(logits, mask_samples, [tg["masks"] for tg in targets])
                losses[self._loss_name(t, "loss_mask")] = loss_mask * weight
            if refined is not None:
                boxes, valid = refined
        return losses

    def _refine(self, stage: int, rois: Tensor, bbox_pred: Tensor, labels: Tensor,
                samples: Sequence[SamplingResult], img_sizes: Sequence[tuple[int, int]]
                ) -> tuple[list[Tensor], list[Tensor]]:
        """The sampled boxes regressed by box head ``stage``, minus the gt boxes the sampler added (mmdet's
        ``refine_bboxes``): the next stage's proposals, and with interleaving this stage's mask candidates.
        Returned as (boxes, valid) per image: the added gts stay in place flagged invalid, which the assigner
        treats exactly as removed, so no boolean compaction waits for the device."""
        regressed = self.bbox_head[stage].regress(rois, bbox_pred.detach(), img_sizes, labels)
        sizes = [s.pos_boxes.shape[0] + s.neg_boxes.shape[0] for s in samples]
        boxes, valid = [], []
        for b, s in zip(regressed.split(sizes), samples):
            keep = torch.ones(len(b), dtype=torch.bool, device=b.device)
            keep[:len(s.pos_is_gt)] = ~s.pos_is_gt.bool()
            boxes.append(b)
            valid.append(keep)
        return boxes, valid

    # ---- inference ------------------------------------------------------------------------------------------
    def refine_and_score(self, feats: Sequence[Tensor], rois: Tensor, img_sizes: Sequence[tuple[int, int]] | Tensor,
                         semantic_feat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The test-time cascade on ``rois`` (K, 5): regress between stages (clipped to each image), average the
        stages' class logits, softmax; decode with the last stage. Returns (scores (K, C + 1), boxes (K, 4), or
        (K, C, 4) with a class-specific regressor)."""
        ms_logits = []
        for t in range(self.num_stages):
            with record_function(f"box_stage{t}"):
                cls_score, bbox_pred = self.box_stage(t, feats, rois, semantic_feat)
            ms_logits.append(cls_score.float())
            if t < self.num_stages - 1:
                labels = cls_score[:, :-1].argmax(1)
                rois = torch.cat([rois[:, :1], self.bbox_head[t].regress(rois, bbox_pred, img_sizes, labels)], 1)
        boxes = self.bbox_head[-1].regress(rois, bbox_pred, img_sizes)
        scores = F.softmax(torch.stack(ms_logits).mean(0), dim=-1)
        return scores, boxes.view(boxes.shape[0], -1, 4).squeeze(1)

    def predict(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], metas: Sequence[ImageMeta],
                rescale: bool = True) -> list[Detections]:
        """Detections per image; with ``rescale`` boxes and masks are in the original frame (``orig_size``),
        else in the resized frame (``img_size``). Labels are 0..num_classes-1."""
        img_sizes = [tuple(m["img_size"]) for m in metas]
        with record_function("semantic_head"):
            sem = self.semantic(feats)
        semantic_feat = None if sem is None else sem[1]
        rois = boxes_to_rois([p[:, :4] for p in proposals]).to(feats[0].device)
        if rois.shape[0]:
            scores, boxes = self.refine_and_score(feats, rois, img_sizes, semantic_feat)
        else:
            scores, boxes = rois.new_zeros(0, self.num_classes + 1), rois.new_zeros(0, 4)
        # rois hold each image's proposals in turn: slices, not a mask that waits for the device
        sizes = [len(p) for p in proposals]
        dets = [self.postprocess_boxes(s, b, meta, rescale)
                for s, b, meta in zip(scores.split(sizes), boxes.split(sizes), metas, strict=True)]
        if not self.with_mask:
            return dets
        mask_rois = boxes_to_rois([d.boxes for d in dets]).to(feats[0].device)
        with record_function("mask_heads"):
            labels = torch.cat([d.labels for d in dets]).to(mask_rois.device)
            probs = self.mask_probs(feats, mask_rois, semantic_feat, labels) if mask_rois.shape[0] else None
        per_image = [None] * len(dets) if probs is None else probs.split([len(d) for d in dets])
        return [self.postprocess_masks(d, p, meta, rescale) for d, p, meta in zip(dets, per_image, metas)]

    # ---- post-processing: the one path of predict() and test-time augmentation ---------------------------
    def postprocess_boxes(self, scores: Tensor, boxes: Tensor, meta: ImageMeta, rescale: bool = True) -> Detections:
        """One image's scored boxes -> its detections by ``multiclass_nms`` (hard or Soft-NMS per ``nms_type``).

        ``scores`` (N, C + 1) with the background column last and ``boxes`` (N, 4) or (N, C, 4) in the resized
        frame, as ``refine_and_score`` returns them (or their mean over TTA views). A box-only head with
        ``rescale`` suppresses in the original frame and returns final detections: mmdet rescales before the
        NMS only when no mask branch rescales after it. A mask head keeps the resized frame, in which its mask
        RoIs are taken: finish with ``postprocess_masks``."""
        if scores.shape[0] == 0:
            return Detections(boxes.new_zeros(0, 4), scores.new_zeros(0),
                              torch.zeros(0, dtype=torch.long, device=scores.device))
        if rescale and not self.with_mask:
            boxes = to_original_frame(boxes, meta)
        with record_function("nms"):
            kept_boxes, kept_scores, labels, _ = multiclass_nms(
                boxes, scores[:, :-1], self.score_thr, self.nms_iou, self.max_per_img, self.nms_type,
                self.soft_nms_sigma, self.soft_nms_min_score)
        return Detections(kept_boxes, kept_scores, labels)

    def postprocess_masks(self, dets: Detections, probs: Tensor | None, meta: ImageMeta,
                          rescale: bool = True) -> Detections:
        """``postprocess_boxes``' detections (resized frame) with each one's mask probabilities ``probs``
        (K, S, S) of its class (``mask_probs(..., labels)``; None when K = 0) -> boxes in the original frame
        with ``rescale`` and masks pasted there at ``orig_size`` (else ``img_size``), thresholded at
        ``mask_thr``."""
        h, w = (int(v) for v in (meta["orig_size"] if rescale else meta["img_size"]))
        boxes = to_original_frame(dets.boxes, meta) if rescale else dets.boxes
        if len(dets) == 0:
            masks = torch.zeros(0, h, w, dtype=torch.bool, device=boxes.device)
        else:
            with record_function("paste_masks"):
                masks = paste_masks(probs, boxes, h, w, threshold=self.mask_thr)
        return Detections(boxes, dets.scores, dets.labels, masks)
