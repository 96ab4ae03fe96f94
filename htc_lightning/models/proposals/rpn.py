"""Region Proposal Network (Ren et al. 2015) with mmdetection 3.3.0's ``RPNHead`` behaviour and
parameter names (``rpn_conv``, ``rpn_cls``, ``rpn_reg``), defaults from the HTC / Cascade configs."""
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...structures import pad_size_of
from ..interfaces import FeatureSpec, ProposalSettings
from ..layers.anchors import AnchorGenerator
from ..layers.assigners import MaxIoUAssigner
from ..layers.box_coder import BoxCoder
from ..layers.samplers import RandomSampler
from .base import (
    anchor_targets,
    default_anchor_assigner,
    default_anchor_sampler,
    objectness_and_delta_losses,
)
from .postprocess import decode_and_suppress, merge_view_proposals, top_scores


class RPN(nn.Module):
    """3x3 conv + ReLU shared over levels, then per-anchor objectness (sigmoid) and box deltas.

    ``forward(feats) -> (cls_scores, bbox_preds)``, lists over levels of (B, A, H, W) and (B, 4A, H, W).

    Args (mmdet's names and defaults, from the HTC / Cascade configs):
        input: the pyramid it runs on (the Detector passes the neck's widths and strides).
        anchor_generator: default 3 ratios (0.5, 1, 2) of scale 8 on the input's strides (4-64 for the FPN).
        assigner: default ``MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3)``.
        sampler: default ``RandomSampler(256, 0.5)`` without gt boxes as proposals (``num: null`` keeps every
            positive and negative anchor, as mmdet with a huge budget).
        box_coder: the delta coder, default ``BoxCoder()`` (means 0, stds 1).
        bbox_loss: "smooth_l1" (beta ``smooth_l1_beta``, HTC/Cascade) or "l1" (Mask R-CNN).
        train_nms_pre, train_max_per_img / test_nms_pre, test_max_per_img: :attr:`train_settings` /
            :attr:`test_settings`, which the caller hands to :meth:`proposals`.
    """

    def __init__(self, input: FeatureSpec, feat_channels: int = 256,
                 anchor_generator: AnchorGenerator | None = None, assigner: MaxIoUAssigner | None = None,
                 sampler: RandomSampler | None = None, box_coder: BoxCoder | None = None, allowed_border: int = 0,
                 loss_cls_weight: float = 1.0, loss_bbox_weight: float = 1.0, smooth_l1_beta: float = 1.0 / 9.0,
                 bbox_loss: Literal["smooth_l1", "l1"] = "smooth_l1",
                 train_nms_pre: int = 2000, train_max_per_img: int = 2000,
                 test_nms_pre: int = 1000, test_max_per_img: int = 1000,
                 nms_iou: float = 0.7, min_bbox_size: float = 0.0) -> None:
        super().__init__()
        if bbox_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"RPN: bbox_loss {bbox_loss!r} is not 'smooth_l1' (HTC/Cascade) or 'l1' (Mask R-CNN)")
        self.bbox_loss = bbox_loss
        if anchor_generator is None:
            anchor_generator = AnchorGenerator(input.strides, (0.5, 1.0, 2.0), scales=(8,))
        self.anchor_generator = anchor_generator
        self.num_anchors = self.anchor_generator.num_base_anchors
        self.rpn_conv = nn.Conv2d(input.width, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, self.num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, self.num_anchors * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):  # mmdet: Normal(std=0.01) on every Conv2d
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        self.assigner = assigner if assigner is not None else default_anchor_assigner()
        self.sampler = sampler if sampler is not None else default_anchor_sampler()
        self.allowed_border = allowed_border
        self.loss_cls_weight = loss_cls_weight
        self.loss_bbox_weight = loss_bbox_weight
        self.smooth_l1_beta = smooth_l1_beta
        self.train_settings = ProposalSettings(train_nms_pre, train_max_per_img)
        self.test_settings = ProposalSettings(test_nms_pre, test_max_per_img)
        self.nms_iou = nms_iou
        self.min_bbox_size = min_bbox_size

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_scores, bbox_preds = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            cls_scores.append(self.rpn_cls(x))
            bbox_preds.append(self.rpn_reg(x))
        return cls_scores, bbox_preds

    def loss(self, raw: tuple[list[Tensor], list[Tensor]], targets: list[dict],
             img_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        cls_scores, bbox_preds = raw
        sizes = [tuple(s.shape[-2:]) for s in cls_scores]
        device = cls_scores[0].device
        anchors = torch.cat(self.anchor_generator.grid_anchors(sizes, device))
        per_image = []
        for target, img_size in zip(targets, img_sizes, strict=True):
            inside = self.anchor_generator.inside_flags(sizes, pad_size_of(target.get("meta", {}), img_size), img_size,
                                                        self.allowed_border, device)
            per_image.append(anchor_targets(anchors, inside, target, self.assigner, self.sampler, self.box_coder))
        loss_cls, loss_bbox = objectness_and_delta_losses(per_image, cls_scores, bbox_preds, self.bbox_loss,
                                                          self.smooth_l1_beta)
        return {"loss_rpn_cls": self.loss_cls_weight * loss_cls, "loss_rpn_bbox": self.loss_bbox_weight * loss_bbox}

    @torch.no_grad()
    def proposals(self, raw: tuple[list[Tensor], list[Tensor]], img_sizes: list[tuple[int, int]],
                  settings: ProposalSettings) -> list[Tensor]:
        cls_scores, bbox_preds = raw
        nms_pre, max_per_img = settings.nms_pre, settings.max_per_img
        sizes = [tuple(s.shape[-2:]) for s in cls_scores]
        anchors = self.anchor_generator.grid_anchors(sizes, cls_scores[0].device)
        # the per-level score ranking of all images at once (a sort per row), then decode and NMS per image
        level_scores, level_deltas, level_anchors, level_ids = [], [], [], []
        for level, (cls, reg, anc) in enumerate(zip(cls_scores, bbox_preds, anchors, strict=True)):
            num = cls.shape[0]
            scores = cls.detach().permute(0, 2, 3, 1).reshape(num, -1).sigmoid()
            deltas = reg.detach().permute(0, 2, 3, 1).reshape(num, -1, 4)
            anc = anc[None].expand(num, -1, -1)
            # mmdet's RPNHead sorts (not topk): the same anchors kept and ordered among tied scores
            scores, order = top_scores(scores, nms_pre, ties="sort")
            if order is not None:
                deltas = torch.gather(deltas, 1, order[..., None].expand(-1, -1, 4))
                anc = torch.gather(anc, 1, order[..., None].expand(-1, -1, 4))
            level_scores.append(scores)
            level_deltas.append(deltas)
            level_anchors.append(anc)
            level_ids.append(torch.full((scores.shape[1],), level, dtype=torch.long, device=scores.device))
        scores, deltas, anchors = torch.cat(level_scores, 1), torch.cat(level_deltas, 1), torch.cat(level_anchors, 1)
        level_ids = torch.cat(level_ids)
        return [decode_and_suppress(self.box_coder, anchors[b], deltas[b], scores[b], img_size, self.min_bbox_size,
                                    self.nms_iou, max_per_img, level_ids, len(level_scores))
                for b, img_size in enumerate(img_sizes)]

    def merge_proposals(self, proposals: Sequence[Tensor]) -> Tensor:
        """Several views' test proposals of one image, in one frame -> one set, with this RPN's test settings
        (``nms_iou``, ``test_settings.max_per_img``), as mmdet's ``merge_aug_proposals`` reads them from
        ``rpn.test_cfg``."""
        return merge_view_proposals(proposals, self.nms_iou, self.test_settings.max_per_img)
