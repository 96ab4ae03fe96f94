"""Guided Anchoring RPN (Wang et al., "Region Proposal by Guided Anchoring", CVPR 2019) with mmdetection
3.3.0's ``GARPNHead`` behaviour and parameter names. The location/shape targets live in ``ga_targets.py``.

mmdet's ``MaskedConv2d`` only handles one image; here ``conv_cls``/``conv_reg`` run densely and
``proposals`` with the location filter on (the test settings) reads them only where the location probability
reaches ``loc_filter_thr``, which gives the same proposals for any batch size.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...structures import pad_size_of
from ..interfaces import FeatureSpec, ProposalSettings
from ..layers.anchors import AnchorGenerator, anchor_inside_flags
from ..layers.assigners import ApproxMaxIoUAssigner, MaxIoUAssigner
from ..layers.box_coder import BoxCoder
from ..layers.deform_conv import Float32DeformConv2d
from ..layers.losses import bounded_iou_loss, focal_loss
from ..layers.samplers import RandomSampler
from ..layers.tracing import exporting
from .base import (
    anchor_targets,
    default_anchor_assigner,
    default_anchor_sampler,
    flatten_levels,
    objectness_and_delta_losses,
)
from .ga_targets import location_targets, shape_targets
from .postprocess import decode_and_suppress, merge_view_proposals, top_scores

GARaw = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


class FeatureAdaption(nn.Module):
    """Sec. 3.3: a 1x1 conv turns the (detached) shape prediction into deformable-conv offsets."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, deform_groups: int = 4) -> None:
        super().__init__()
        self.conv_offset = nn.Conv2d(2, deform_groups * kernel_size * kernel_size * 2, 1, bias=False)
        self.conv_adaption = Float32DeformConv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2,
                                          bias=False)
        nn.init.normal_(self.conv_offset.weight, std=0.1)  # mmdet's FeatureAdaption init
        nn.init.normal_(self.conv_adaption.weight, std=0.01)

    def forward(self, x: Tensor, shape: Tensor) -> Tensor:
        return F.relu(self.conv_adaption(x, self.conv_offset(shape.detach())))


class GARPN(nn.Module):
    """``forward(feats) -> (cls_scores, bbox_preds, shape_preds, loc_preds)``, each a list over levels of
    (B, 1, H, W), (B, 4, H, W), (B, 2, H, W), (B, 1, H, W) (mmdet's order).

    Args (mmdet's ``ga-rpn_r50_fpn_1x_coco`` names and defaults):
        input: the pyramid it runs on (the Detector passes the neck's widths and strides).
        strides: of the anchors; default the input's.
        octave_base_scale, scales_per_octave, approx_ratios: the approx anchors (9 per location) that
            score a shape and the squares (one per location) that the predicted shape scales; the location
            targets use the same strides and base scale.
        assigner, sampler: the guided anchors' objectness targets (``MaxIoUAssigner(0.7, 0.3, 0.3)``,
            ``RandomSampler(256, 0.5)``).
        ga_assigner, ga_sampler: the shape targets over the approx anchors (``ApproxMaxIoUAssigner(0.7, 0.3,
            0.3)``, ``RandomSampler(256, 0.5)``).
        anchor_coder: squares -> guided anchors (stds 0.07/0.14, no ratio clip); box_coder: guided anchors ->
            proposals (stds 0.07/0.11).
        invert_loc_targets: train the location branch as mmdet >= 2.0 does (centres negative; see
            docs/ga_location_targets.md).
        train_* / test_*: :attr:`train_settings` / :attr:`test_settings` (the location filter only at test), which
            the caller hands to :meth:`proposals`.
    """

    def __init__(self, input: FeatureSpec, feat_channels: int = 256,
                 strides: Sequence[int] | None = None, octave_base_scale: int = 8, scales_per_octave: int = 3,
                 approx_ratios: Sequence[float] = (0.5, 1.0, 2.0), deform_groups: int = 4,
                 assigner: MaxIoUAssigner | None = None, sampler: RandomSampler | None = None,
                 ga_assigner: ApproxMaxIoUAssigner | None = None, ga_sampler: RandomSampler | None = None,
                 anchor_coder: BoxCoder | None = None, box_coder: BoxCoder | None = None,
                 loc_filter_thr: float = 0.01, center_ratio: float = 0.2, ignore_ratio: float = 0.5,
                 invert_loc_targets: bool = False, allowed_border: int = -1,
                 loss_loc_weight: float = 1.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 loss_shape_weight: float = 1.0, bounded_iou_beta: float = 0.2,
                 loss_cls_weight: float = 1.0, loss_bbox_weight: float = 1.0, smooth_l1_beta: float = 1.0,
                 train_nms_pre: int = 2000, train_nms_post: int = 1000, train_max_per_img: int = 300,
                 test_nms_pre: int = 2000, test_nms_post: int = 1000, test_max_per_img: int = 1000,
                 nms_iou: float = 0.7, min_bbox_size: float = 0.0) -> None:
        super().__init__()
        self.strides = tuple(input.strides if strides is None else strides)
        strides = self.strides
        self.octave_base_scale = octave_base_scale
        self.approx_generator = AnchorGenerator(strides, approx_ratios, octave_base_scale=octave_base_scale,
                                                scales_per_octave=scales_per_octave)
        self.square_generator = AnchorGenerator(strides, (1.0,), scales=(octave_base_scale,))
        self.approxs_per_octave = self.approx_generator.num_base_anchors

        self.rpn_conv = nn.Conv2d(input.width, feat_channels, 3, padding=1)
        self.conv_loc = nn.Conv2d(feat_channels, 1, 1)
        self.conv_shape = nn.Conv2d(feat_channels, 2, 1)
        self.feature_adaption = FeatureAdaption(feat_channels, feat_channels, 3, deform_groups)
        self.conv_cls = nn.Conv2d(feat_channels, 1, 1)
        self.conv_reg = nn.Conv2d(feat_channels, 4, 1)
        for conv in (self.rpn_conv, self.conv_loc, self.conv_shape, self.conv_cls, self.conv_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.conv_loc.bias, -math.log((1 - 0.01) / 0.01))  # location prior 0.01

        # guided anchors come from squares through the anchor coder without a ratio clip (mmdet: 1e-6)
        self.anchor_coder = anchor_coder if anchor_coder is not None else BoxCoder(
            (0.0,) * 4, (0.07, 0.07, 0.14, 0.14), wh_ratio_clip=1e-6)
        self.box_coder = box_coder if box_coder is not None else BoxCoder((0.0,) * 4, (0.07, 0.07, 0.11, 0.11))
        self.loc_filter_thr = loc_filter_thr
        self.center_ratio, self.ignore_ratio = center_ratio, ignore_ratio
        self.invert_loc_targets = invert_loc_targets
        self.assigner = assigner if assigner is not None else default_anchor_assigner()
        self.ga_assigner = ga_assigner if ga_assigner is not None else ApproxMaxIoUAssigner(0.7, 0.3, 0.3)
        self.sampler = sampler if sampler is not None else default_anchor_sampler()
        self.ga_sampler = ga_sampler if ga_sampler is not None else default_anchor_sampler()
        self.allowed_border = allowed_border
        self.loss_loc_weight, self.focal_alpha, self.focal_gamma = loss_loc_weight, focal_alpha, focal_gamma
        self.loss_shape_weight, self.bounded_iou_beta = loss_shape_weight, bounded_iou_beta
        self.loss_cls_weight, self.loss_bbox_weight = loss_cls_weight, loss_bbox_weight
        self.smooth_l1_beta = smooth_l1_beta
        self.train_settings = ProposalSettings(train_nms_pre, train_max_per_img, train_nms_post)
        self.test_settings = ProposalSettings(test_nms_pre, test_max_per_img, test_nms_post, location_filter=True)
        self.nms_iou = nms_iou
        self.min_bbox_size = min_bbox_size

    def forward(self, feats: list[Tensor]) -> GARaw:
        cls_scores, bbox_preds, shape_preds, loc_preds = [], [], [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            loc = self.conv_loc(x)
            shape = self.conv_shape(x)
            x = self.feature_adaption(x, shape)
            cls_scores.append(self.conv_cls(x))
            bbox_preds.append(self.conv_reg(x))
            shape_preds.append(shape)
            loc_preds.append(loc)
        return cls_scores, bbox_preds, shape_preds, loc_preds

    def location_mask(self, loc: Tensor, location_filter: bool) -> Tensor:
        """Bool, the shape of the location logits ``loc``: the locations that take part. With the filter (test
        settings) those whose probability reaches ``loc_filter_thr`` (the paper's location filter), else all
        (mmdet's ``use_loc_filter = not training``, and ``sigmoid >= 0.0`` otherwise)."""
        return loc.detach().sigmoid() >= (self.loc_filter_thr if location_filter else 0.0)

    def guided_anchors(self, squares: Tensor, shape_pred: Tensor) -> Tensor:
        """Squares (N, 4) scaled by the predicted (dw, dh) of shape (N, 2), centres kept; no gradient."""
        deltas = torch.cat([torch.zeros_like(shape_pred), shape_pred], dim=1).detach()
        return self.anchor_coder.decode(squares, deltas)

    def loss(self, raw: GARaw, targets: list[dict], img_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        # targets from the guided anchors in float32 under fp16 autocast (mmdet's force_fp32 on this loss)
        cls_scores, bbox_preds, shape_preds, loc_preds = ([p.float() for p in preds] for preds in raw)
        sizes = [tuple(s.shape[-2:]) for s in cls_scores]
        device = cls_scores[0].device

        # anchor location branch: focal loss over every location of every level
        gt_list = [t["boxes"].to(device=device, dtype=torch.float32) for t in targets]
        loc_t, loc_w, loc_avg = location_targets(gt_list, sizes, self.strides, self.octave_base_scale,
                                                 self.center_ratio, self.ignore_ratio)
        loc_logits = torch.cat([p.reshape(-1) for p in loc_preds])[:, None]
        loc_targets = torch.cat([t.reshape(-1) for t in loc_t])
        if self.invert_loc_targets:
            # mmdet >= 2.0 hands the 0/1 map to FocalLoss as class indices with index 1 = background, so the
            # centre region is trained towards 0 and the rest towards 1; the oracle's loss_anchor_loc needs it.
            loc_targets = 1 - loc_targets
        loss_loc = focal_loss(loc_logits, loc_targets[:, None], torch.cat([w.reshape(-1) for w in loc_w]),
                              alpha=self.focal_alpha, gamma=self.focal_gamma, avg_factor=loc_avg)

        approxs = torch.cat(self.approx_generator.grid_anchors(sizes, device))
        squares = torch.cat(self.square_generator.grid_anchors(sizes, device))
        shape_flat = flatten_levels(shape_preds, 2)
        cls_targets, shape_tgts = [], []
        for b, (target, img_size) in enumerate(zip(targets, img_sizes, strict=True)):
            pad_size = pad_size_of(target.get("meta", {}), img_size)
            valid = torch.cat(self.approx_generator.valid_flags(sizes, pad_size, device))
            # a location is usable when any of its approx anchors is (mmdet's get_sampled_approxs)
            inside = anchor_inside_flags(approxs, valid, img_size, self.allowed_border)
            inside = inside.view(-1, self.approxs_per_octave).any(dim=1)
            shape_tgts.append(shape_targets(approxs, squares, inside, target, self.ga_assigner, self.ga_sampler,
                                            self.approxs_per_octave))
            anchors = self.guided_anchors(squares, shape_flat[b])
            cls_inside = anchor_inside_flags(anchors, inside, img_size, self.allowed_border)
            cls_targets.append(anchor_targets(anchors, cls_inside, target, self.assigner, self.sampler,
                                              self.box_coder))

        # anchor shape branch: bounded IoU between the guided anchor and its gt, positives only
        ga_avg = float(sum(s.avg_factor for s in shape_tgts))
        pos = torch.cat([s.weights for s in shape_tgts]) > 0
        sq = torch.cat([s.squares for s in shape_tgts])[pos]
        gts = torch.cat([s.gt_boxes for s in shape_tgts])[pos]
        pred_shape = shape_flat.reshape(-1, 2)[pos]
        pred_anchors = self.anchor_coder.decode(sq, torch.cat([torch.zeros_like(pred_shape), pred_shape], dim=1))
        if bool(pos.any()):
            loss_shape = bounded_iou_loss(pred_anchors, gts, beta=self.bounded_iou_beta,
                                          weight=torch.ones_like(pred_anchors), avg_factor=ga_avg)
        else:
            loss_shape = shape_flat.sum() * 0

        # objectness and deltas on the guided anchors of all locations (no location filter in training)
        loss_cls, loss_bbox = objectness_and_delta_losses(cls_targets, cls_scores, bbox_preds,
                                                          smooth_l1_beta=self.smooth_l1_beta)
        return {"loss_rpn_cls": self.loss_cls_weight * loss_cls, "loss_rpn_bbox": self.loss_bbox_weight * loss_bbox,
                "loss_anchor_shape": self.loss_shape_weight * loss_shape,
                "loss_anchor_loc": self.loss_loc_weight * loss_loc}

    @torch.no_grad()
    def proposals(self, raw: GARaw, img_sizes: list[tuple[int, int]], settings: ProposalSettings) -> list[Tensor]:
        cls_scores, bbox_preds, shape_preds, loc_preds = raw
        nms_pre, max_per_img = settings.nms_pre, settings.max_per_img
        nms_post = settings.nms_post if settings.nms_post is not None else settings.max_per_img
        sizes = [tuple(s.shape[-2:]) for s in cls_scores]
        squares = self.square_generator.grid_anchors(sizes, cls_scores[0].device)
        results = []
        for b, img_size in enumerate(img_sizes):
            per_level = []
            for cls, reg, shape, loc, sq in zip(cls_scores, bbox_preds, shape_preds, loc_preds, squares, strict=True):
                keep = self.location_mask(loc[b, 0], settings.location_filter).reshape(-1)
                if not exporting() and not bool(keep.any()):  # a graph runs the level's empty selection
                    continue
                scores = cls[b, 0].detach().reshape(-1)[keep].sigmoid()
                deltas = reg[b].detach().permute(1, 2, 0).reshape(-1, 4)[keep]
                anchors = self.guided_anchors(sq[keep], shape[b].detach().permute(1, 2, 0).reshape(-1, 2)[keep])
                # mmdet's GARPNHead takes torch.topk (RPNHead sorts): the same anchors among tied scores
                scores, order = top_scores(scores, nms_pre, ties="topk")
                if order is not None:
                    deltas, anchors = deltas[order], anchors[order]
                # one level at a time, each NMSed alone and cut to nms_post, as mmdet's GARPNHead
                per_level.append(decode_and_suppress(self.box_coder, anchors, deltas, scores, img_size,
                                                     self.min_bbox_size, self.nms_iou, nms_post))
            if not per_level:
                results.append(cls_scores[0].new_zeros(0, 5))
                continue
            props = torch.cat(per_level)
            top = props[:, 4].topk(torch.sym_min(max_per_img, props.shape[0])).indices
            results.append(props[top])
        return results

    def merge_proposals(self, proposals: Sequence[Tensor]) -> Tensor:
        """Several views' test proposals of one image, in one frame -> one set, with this head's test settings
        (``nms_iou``, ``test_settings.max_per_img``), as mmdet's ``merge_aug_proposals`` reads them from
        ``rpn.test_cfg``."""
        return merge_view_proposals(proposals, self.nms_iou, self.test_settings.max_per_img)
