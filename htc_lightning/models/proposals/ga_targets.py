"""Guided Anchoring training targets (Wang et al. 2019, Sec. 3.1-3.2) as mmdetection 3.3.0 builds them:
the location maps (centre / ignore / negative regions) and the approx-anchor shape assignment."""
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.assigners import ApproxMaxIoUAssigner
from ..layers.samplers import RandomSampler
from .base import class_agnostic_gt, unmap


def scaled_region(box: Tensor, ratio: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box shrunk about its centre to keep the middle ``1 - 2 * ratio`` of each side, in feature-map cells,
    rounded (half to even, torch.round) and clamped to [0, W] x [0, H] (mmdet's ``calc_region``)."""
    x1 = torch.round((1 - ratio) * box[0] + ratio * box[2]).long().clamp(0, size[1])
    y1 = torch.round((1 - ratio) * box[1] + ratio * box[3]).long().clamp(0, size[0])
    x2 = torch.round(ratio * box[0] + (1 - ratio) * box[2]).long().clamp(0, size[1])
    y2 = torch.round(ratio * box[1] + (1 - ratio) * box[3]).long().clamp(0, size[0])
    return int(x1), int(y1), int(x2), int(y2)


def location_targets(gt_boxes: list[Tensor], featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                     octave_base_scale: float, center_ratio: float = 0.2, ignore_ratio: float = 0.5
                     ) -> tuple[list[Tensor], list[Tensor], float]:
    """Per level (B, 1, H, W) targets and weights, and the loss normaliser.

    A gt goes to level floor(log2(sqrt(wh) / (octave_base_scale * strides[0])) + 0.5); there its central
    ``center_ratio`` region is positive (weight 1) and its central ``ignore_ratio`` region otherwise ignored
    (weight 0); the ignore region is also applied to the two adjacent levels; every other cell is a negative of
    weight 0.1. Gts are painted in order, so a later gt's ignore region can zero an earlier gt's centre weight
    (mmdet does the same). The normaliser is (number of cells over all levels and images) / 200.
    """
    num_imgs, num_levels = len(gt_boxes), len(featmap_sizes)
    r_center = (1 - center_ratio) / 2
    r_ignore = (1 - ignore_ratio) / 2
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    targets = [torch.zeros(num_imgs, 1, h, w, device=device) for h, w in featmap_sizes]
    weights = [torch.full((num_imgs, 1, h, w), -1.0, device=device) for h, w in featmap_sizes]
    ignore = [torch.zeros(num_imgs, 1, h, w, device=device) for h, w in featmap_sizes]
    min_anchor = float(octave_base_scale * strides[0])
    for b, boxes in enumerate(gt_boxes):
        if boxes.numel() == 0:
            continue
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        levels = torch.floor(torch.log2(scale) - torch.log2(scale.new_tensor(min_anchor)) + 0.5)
        levels = levels.clamp(0, num_levels - 1).long().tolist()
        for box, lvl in zip(boxes, levels, strict=True):
            box_l = box / strides[lvl]
            ix1, iy1, ix2, iy2 = scaled_region(box_l, r_ignore, featmap_sizes[lvl])
            cx1, cy1, cx2, cy2 = scaled_region(box_l, r_center, featmap_sizes[lvl])
            targets[lvl][b, 0, cy1:cy2 + 1, cx1:cx2 + 1] = 1
            weights[lvl][b, 0, iy1:iy2 + 1, ix1:ix2 + 1] = 0
            weights[lvl][b, 0, cy1:cy2 + 1, cx1:cx2 + 1] = 1
            for near in (lvl - 1, lvl + 1):
                if 0 <= near < num_levels:
                    x1, y1, x2, y2 = scaled_region(box / strides[near], r_ignore, featmap_sizes[near])
                    ignore[near][b, 0, y1:y2 + 1, x1:x2 + 1] = 1
    for w, ign in zip(weights, ignore, strict=True):
        w[(w < 0) & (ign > 0)] = 0
        w[w < 0] = 0.1
    avg_factor = sum(num_imgs * h * w for h, w in featmap_sizes) / 200
    return targets, weights, avg_factor


@dataclass
class ShapeTargets:
    """One image, over all locations (levels concatenated): the square and gt of each sampled positive."""

    squares: Tensor   # (N, 4), zero where not positive
    gt_boxes: Tensor  # (N, 4)
    weights: Tensor   # (N,) 1 for positives
    avg_factor: int   # max(#pos, 1) + max(#neg, 1)


def shape_targets(approxs: Tensor, squares: Tensor, inside: Tensor, target: dict, assigner: ApproxMaxIoUAssigner,
                  sampler: RandomSampler, approxs_per_octave: int) -> ShapeTargets:
    """Assign each usable location to a gt by the best IoU of its approx anchors (ApproxMaxIoU), then sample."""
    if not bool(inside.any()):
        raise ValueError(f"no location of {squares.shape[0]} lies inside the image: check the image size, or set "
                         "allowed_border to -1")
    gt_boxes, gt_labels, ignore = class_agnostic_gt(target, squares)
    loc_approxs = approxs.view(-1, approxs_per_octave, 4)[inside].reshape(-1, 4)
    loc_squares = squares[inside]
    assign = assigner.assign_approx(loc_approxs, loc_squares, approxs_per_octave, gt_boxes, gt_labels, ignore)
    sampled = sampler.sample(assign, loc_squares, gt_boxes, gt_labels)
    n = loc_squares.shape[0]
    sq, gts, w = squares.new_zeros(n, 4), squares.new_zeros(n, 4), squares.new_zeros(n)
    pos = sampled.pos_inds
    if pos.numel() > 0:
        sq[pos] = sampled.pos_boxes
        gts[pos] = sampled.pos_gt_boxes
        w[pos] = 1.0
    avg_factor = max(int(pos.numel()), 1) + max(int(sampled.neg_inds.numel()), 1)
    return ShapeTargets(unmap(sq, inside), unmap(gts, inside), unmap(w, inside), avg_factor)
