"""Target assignment: which gt box (if any) each candidate box learns from."""
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(M, N) IoU. torchvision's ``box_iou`` computes mmdet's ``bbox_overlaps`` with the same operations;
    the only difference is a zero union (two empty boxes), where mmdet divides by eps and gets 0, not NaN.
    A fifth (score) column is ignored, as mmdet's ``BboxOverlaps2D`` does."""
    boxes1, boxes2 = boxes1[:, :4], boxes2[:, :4]
    if boxes1.numel() == 0 or boxes2.numel() == 0:
        return boxes1.new_zeros((boxes1.shape[0], boxes2.shape[0]))
    return torch.nan_to_num(box_iou(boxes1, boxes2), nan=0.0)


def pairwise_iof(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """(M, N) intersection over the area of ``boxes1`` (mmdet's ``mode='iof'``, area floored at ``eps``)."""
    boxes1, boxes2 = boxes1[:, :4], boxes2[:, :4]
    if boxes1.numel() == 0 or boxes2.numel() == 0:
        return boxes1.new_zeros((boxes1.shape[0], boxes2.shape[0]))
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1] / area1[:, None].clamp(min=eps)


@dataclass
class AssignResult:
    """``gt_inds``: (N,) long, -1 ignore, 0 negative, k > 0 positive for gt ``k - 1`` (mmdet's convention).
    ``max_overlaps``: (N,) IoU with the assigned/best gt. ``labels``: (N,) long, gt label of positives, -1 elsewhere."""

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    @property
    def num_candidates(self) -> int:
        return int(self.gt_inds.shape[0])

    def add_gt_(self, gt_labels: Tensor) -> None:
        """Prepend the gt boxes themselves as positives (for ``add_gt_as_proposals``)."""
        num = int(gt_labels.shape[0])
        self_inds = torch.arange(1, num + 1, dtype=torch.long, device=self.gt_inds.device)
        self.gt_inds = torch.cat([self_inds, self.gt_inds])
        self.max_overlaps = torch.cat([self.max_overlaps.new_ones(num), self.max_overlaps])
        self.labels = torch.cat([gt_labels.to(self.labels), self.labels])


class MaxIoUAssigner:
    """mmdet ``MaxIoUAssigner``: neg if max IoU in [0, neg_iou_thr) (or in the range if a tuple), pos if
    >= pos_iou_thr, then (``match_low_quality``) every gt takes its best candidates if that IoU >= min_pos_iou
    (all ties when ``gt_max_assign_all``). Candidates whose IoF with a crowd/ignore box exceeds
    ``ignore_iof_thr`` become -1.

    Without ``gt_labels`` the positives get label 0 (the RPN's single foreground class, as mmdet's RPN sets).
    """

    def __init__(self, pos_iou_thr: float, neg_iou_thr: float | tuple[float, float], min_pos_iou: float = 0.0,
                 match_low_quality: bool = True, gt_max_assign_all: bool = True, ignore_iof_thr: float = -1.0,
                 ignore_wrt_candidates: bool = True) -> None:
        if isinstance(neg_iou_thr, Sequence):
            if len(neg_iou_thr) != 2:
                raise ValueError(f"MaxIoUAssigner: neg_iou_thr range needs (low, high), got {neg_iou_thr}")
            neg_iou_thr = (float(neg_iou_thr[0]), float(neg_iou_thr[1]))
        else:
            neg_iou_thr = float(neg_iou_thr)
        self.pos_iou_thr = float(pos_iou_thr)
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = float(min_pos_iou)
        self.match_low_quality = match_low_quality
        self.gt_max_assign_all = gt_max_assign_all
        self.ignore_iof_thr = float(ignore_iof_thr)
        self.ignore_wrt_candidates = ignore_wrt_candidates

    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               gt_boxes_ignore: Tensor | None = None, valid: Tensor | None = None) -> AssignResult:
        """``valid`` (N,) bool: candidates flagged False take no part (gt_inds -1, never a gt's best match),
        exactly as if they had been removed, but the shapes stay fixed (no boolean-mask compaction)."""
        overlaps = pairwise_iou(gt_boxes, boxes)
        overlaps = self._mark_ignored(overlaps, boxes, gt_boxes_ignore)
        if valid is not None and overlaps.numel():
            overlaps = torch.where(valid[None, :], overlaps, overlaps.new_tensor(-1.0))
        return self.assign_wrt_overlaps(overlaps, gt_labels)

    def _mark_ignored(self, overlaps: Tensor, boxes: Tensor, gt_boxes_ignore: Tensor | None) -> Tensor:
        # mmdet sets the whole column to -1, so an ignored candidate is neither neg (needs IoU >= 0) nor pos,
        # unless a gt's best IoU is itself -1 and min_pos_iou allows it (never with min_pos_iou >= 0).
        if (self.ignore_iof_thr <= 0 or gt_boxes_ignore is None or gt_boxes_ignore.numel() == 0
                or boxes.numel() == 0 or overlaps.numel() == 0):
            return overlaps
        if self.ignore_wrt_candidates:
            ignore_max = pairwise_iof(boxes, gt_boxes_ignore).max(dim=1).values
        else:
            ignore_max = pairwise_iof(gt_boxes_ignore, boxes).max(dim=0).values
        return torch.where(ignore_max[None, :] > self.ignore_iof_thr, overlaps.new_tensor(-1.0), overlaps)

    def assign_wrt_overlaps(self, overlaps: Tensor, gt_labels: Tensor | None = None) -> AssignResult:
        """Assignment from a (num_gts, num_candidates) overlap matrix (mmdet's ``assign_wrt_overlaps``), in
        fixed-shape tensor arithmetic: no host-device sync."""
        num_gts, num_boxes = overlaps.shape
        device = overlaps.device
        gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
        if num_gts == 0 or num_boxes == 0:
            # No gts: everything is background, crowd boxes included (mmdet returns before the ignore rule).
            if num_gts == 0:
                gt_inds.zero_()
            return AssignResult(num_gts, gt_inds, overlaps.new_zeros((num_boxes,)),
                                torch.full((num_boxes,), -1, dtype=torch.long, device=device))

        max_overlaps, argmax = overlaps.max(dim=0)
        gt_max_overlaps, gt_argmax = overlaps.max(dim=1)

        if isinstance(self.neg_iou_thr, tuple):
            low, high = self.neg_iou_thr
            neg = (max_overlaps >= low) & (max_overlaps < high)
        else:
            neg = (max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)
        gt_inds = torch.where(neg, 0, gt_inds)
        gt_inds = torch.where(max_overlaps >= self.pos_iou_thr, argmax + 1, gt_inds)

        if self.match_low_quality:
            # mmdet loops over the gts and a later gt overrides an earlier one on a shared best candidate:
            # the candidate goes to the LAST gt that claims it.
            if self.gt_max_assign_all:
                claims = overlaps == gt_max_overlaps[:, None]
            else:
                claims = torch.arange(num_boxes, device=device)[None, :] == gt_argmax[:, None]
            claims = claims & (gt_max_overlaps >= self.min_pos_iou)[:, None]
            last = num_gts - 1 - claims.flip(0).to(torch.uint8).argmax(dim=0)
            gt_inds = torch.where(claims.any(dim=0), last + 1, gt_inds)

        pos = gt_inds > 0
        if gt_labels is None:
            labels = torch.where(pos, 0, -1)
        else:
            gt_labels = gt_labels.to(device=device, dtype=torch.long)
            labels = torch.where(pos, gt_labels[(gt_inds - 1).clamp(min=0)], -1)
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)


class ApproxMaxIoUAssigner(MaxIoUAssigner):
    """mmdet ``ApproxMaxIoUAssigner`` (Guided Anchoring shape targets): the IoU of a location with a gt is the
    max over its ``approxs_per_octave`` approx anchors; assignment is then MaxIoU on the squares."""

    def assign_approx(self, approxs: Tensor, squares: Tensor, approxs_per_octave: int, gt_boxes: Tensor,
                      gt_labels: Tensor | None = None, gt_boxes_ignore: Tensor | None = None) -> AssignResult:
        """``approxs``: (N * approxs_per_octave, 4) laid out as mmdet's (location-major); ``squares``: (N, 4)."""
        num_squares = squares.shape[0]
        if approxs.shape[0] != num_squares * approxs_per_octave:
            raise ValueError(f"ApproxMaxIoUAssigner: {approxs.shape[0]} approxs for {num_squares} squares x "
                             f"{approxs_per_octave} per octave")
        num_gts = gt_boxes.shape[0]
        if num_squares == 0 or num_gts == 0:
            return self.assign_wrt_overlaps(squares.new_zeros((num_gts, num_squares)), gt_labels)
        # Location-major approxs: row n * A + a is approx a of location n. The max over a is exact, so the
        # order in which mmdet transposes before its IoU does not change the numbers.
        overlaps = pairwise_iou(approxs, gt_boxes).view(num_squares, approxs_per_octave, num_gts)
        overlaps = overlaps.max(dim=1).values.t()
        overlaps = self._mark_ignored(overlaps, squares, gt_boxes_ignore)
        return self.assign_wrt_overlaps(overlaps, gt_labels)
