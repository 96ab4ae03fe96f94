"""What the plain RPN and GA-RPN share: the anchor-target step (assign, sample, encode) of mmdet's
``AnchorHead._get_targets_single`` and the objectness / delta losses. Their interface is
``interfaces.ProposalGenerator``."""
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.assigners import MaxIoUAssigner
from ..layers.box_coder import BoxCoder
from ..layers.losses import binary_cross_entropy, l1_loss, smooth_l1_loss
from ..layers.samplers import RandomSampler


@dataclass
class AnchorTargets:
    """Per-image targets over all anchors of all levels (flattened level after level)."""

    labels: Tensor          # (N,) long: 0 foreground, 1 background (mmdet's RPN label convention)
    label_weights: Tensor   # (N,) float
    bbox_targets: Tensor    # (N, 4) encoded deltas
    bbox_weights: Tensor    # (N, 4)
    avg_factor: int         # max(#pos, 1) + max(#neg, 1), as mmdet's SamplingResult.avg_factor


def default_anchor_assigner() -> MaxIoUAssigner:
    """mmdet's RPN/GA-RPN anchor assigner: positive from IoU 0.7, negative below 0.3, low-quality matches >= 0.3."""
    return MaxIoUAssigner(0.7, 0.3, 0.3)


def default_anchor_sampler() -> RandomSampler:
    """mmdet's RPN/GA-RPN sampler: 256 anchors per image, half positive, gt boxes never added as candidates."""
    return RandomSampler(256, 0.5, add_gt_as_proposals=False)


def class_agnostic_gt(target: dict, like: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(gt boxes, all-zero labels, crowd boxes or None) of one image on ``like``'s device and dtype: proposal
    heads are class-agnostic, every gt is foreground 0 (mmdet zeroes the labels for rpn_data_samples)."""
    gt_boxes = target["boxes"].to(like)
    gt_labels = torch.zeros(gt_boxes.shape[0], dtype=torch.long, device=like.device)
    ignore = target.get("crowd_boxes")
    ignore = ignore.to(like) if ignore is not None and ignore.numel() > 0 else None
    return gt_boxes, gt_labels, ignore


def anchor_targets(anchors: Tensor, inside: Tensor, target: dict, assigner: MaxIoUAssigner, sampler: RandomSampler,
                   coder: BoxCoder) -> AnchorTargets:
    """Assign and sample the anchors flagged ``inside``; anchors outside get label 1 with weight 0.

    The anchors outside take no part in the assignment (``valid``), exactly as if removed, so no boolean
    compaction of the anchors (and scatter back) waits for the device; the sampler's counts are the one
    host transfer."""
    gt_boxes, gt_labels, ignore = class_agnostic_gt(target, anchors)
    assign = assigner.assign(anchors, gt_boxes, gt_labels, ignore, valid=inside)
    counts = sampler.candidate_counts([assign])[0]
    if sum(counts) == 0 and not bool(inside.any()):  # asks the device only when nothing was assigned
        raise ValueError(f"no anchor of {anchors.shape[0]} lies inside the image: check the image size and "
                         "anchor sizes, or set allowed_border to -1")
    sampled = sampler.sample(assign, anchors, gt_boxes, gt_labels, counts=counts)

    n = anchors.shape[0]
    labels = torch.ones(n, dtype=torch.long, device=anchors.device)
    label_weights = anchors.new_zeros(n)
    bbox_targets = anchors.new_zeros(n, 4)
    bbox_weights = anchors.new_zeros(n, 4)
    pos, neg = sampled.pos_inds, sampled.neg_inds
    if pos.numel() > 0:
        bbox_targets[pos] = coder.encode(sampled.pos_boxes, sampled.pos_gt_boxes)
        bbox_weights[pos] = 1.0
        labels[pos] = 0
        label_weights[pos] = 1.0
    if neg.numel() > 0:
        label_weights[neg] = 1.0
    avg_factor = max(int(pos.numel()), 1) + max(int(neg.numel()), 1)
    return AnchorTargets(labels, label_weights, bbox_targets, bbox_weights, avg_factor)


def unmap(data: Tensor, inside: Tensor, fill: float = 0) -> Tensor:
    """Scatter per-candidate values back onto all anchors."""
    out = data.new_full((inside.shape[0], *data.shape[1:]), fill)
    out[inside] = data
    return out


def flatten_levels(maps: Sequence[Tensor], channels: int) -> Tensor:
    """(B, A*C, H, W) per level -> (B, sum(H*W*A), C), anchor index (y * W + x) * A + a as mmdet."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, channels) for m in maps], dim=1)


def objectness_and_delta_losses(per_image: Sequence[AnchorTargets], cls_scores: Sequence[Tensor],
                                bbox_preds: Sequence[Tensor], bbox_loss: str = "smooth_l1",
                                smooth_l1_beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Sigmoid objectness and box-delta losses over the sampled anchors of a batch, both divided by the
    sampled count summed over the batch and the levels, as mmdet normalises every level's loss."""
    avg_factor = float(sum(t.avg_factor for t in per_image))
    labels = torch.stack([t.labels for t in per_image]).flatten()
    label_weights = torch.stack([t.label_weights for t in per_image]).flatten()
    bbox_targets = torch.stack([t.bbox_targets for t in per_image]).reshape(-1, 4)
    bbox_weights = torch.stack([t.bbox_weights for t in per_image]).reshape(-1, 4)
    logits = flatten_levels(cls_scores, 1).reshape(-1, 1)
    deltas = flatten_levels(bbox_preds, 4).reshape(-1, 4)
    loss_cls = binary_cross_entropy(logits, (labels == 0).to(logits.dtype)[:, None], label_weights[:, None],
                                    avg_factor=avg_factor)
    if bbox_loss == "l1":
        loss_bbox = l1_loss(deltas, bbox_targets, weight=bbox_weights, avg_factor=avg_factor)
    else:
        loss_bbox = smooth_l1_loss(deltas, bbox_targets, beta=smooth_l1_beta, weight=bbox_weights,
                                   avg_factor=avg_factor)
    return loss_cls, loss_bbox
