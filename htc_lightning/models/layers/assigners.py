"""Target assignment: which gt box (if any) each candidate box learns from."""
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(..., M, N) IoU of (..., M, 4+) and (..., N, 4+) boxes (leading dims batch several images). The
    arithmetic of torchvision's ``box_iou``, which computes mmdet's ``bbox_overlaps`` with the same
    operations; the only difference is a zero union (two empty boxes), where mmdet divides by eps and gets 0,
    not NaN. A fifth (score) column is ignored, as mmdet's ``BboxOverlaps2D`` does."""
    boxes1, boxes2 = boxes1[..., :4], boxes2[..., :4]
    if boxes1.numel() == 0 or boxes2.numel() == 0:
        return boxes1.new_zeros((*boxes1.shape[:-1], boxes2.shape[-2]))
    # (x2 - x1) * (y2 - y1) as a product over the last axis: the same two roundings in fewer ops
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).prod(-1)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area1[..., :, None] + area2[..., None, :] - inter
    return torch.nan_to_num(inter / union, nan=0.0)


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
        if valid is None:
            return self.assign_wrt_overlaps(overlaps, gt_labels)
        if overlaps.numel():
            overlaps = torch.where(valid[None, :], overlaps, overlaps.new_tensor(-1.0))
        result = self.assign_wrt_overlaps(overlaps, gt_labels)
        # an all -1 column is already neither pos nor neg; without gts every candidate would be a negative
        result.gt_inds = torch.where(valid, result.gt_inds, -1)
        result.labels = torch.where(valid, result.labels, -1)
        return result

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

    def assign_batch(self, boxes: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                     gt_labels: Sequence[Tensor] | None = None,
                     valid: Sequence[Tensor] | None = None) -> list[AssignResult]:
        """``assign`` of several images at once: candidates and gts padded to the largest image, padding taking
        no part (IoU -1, as an invalid candidate), so each result equals that image's own ``assign``. Images
        without gts or candidates are assigned one by one (their early exit)."""
        num = len(boxes)
        if num == 1 or any(g.shape[0] == 0 for g in gt_boxes) or any(b.shape[0] == 0 for b in boxes):
            return [self.assign(b, g, None if gt_labels is None else lab, None,
                                None if valid is None else v)
                    for b, g, lab, v in zip(boxes, gt_boxes, gt_labels or [None] * num, valid or [None] * num)]
        device = boxes[0].device
        sizes = [b.shape[0] for b in boxes]
        gt_sizes = [g.shape[0] for g in gt_boxes]
        cand = _pad([b[:, :4] for b in boxes])
        gts = _pad([g[:, :4].to(cand.dtype) for g in gt_boxes])
        overlaps = pairwise_iou(gts, cand)
        padded = len(set(sizes)) > 1 or len(set(gt_sizes)) > 1
        if padded or valid is not None:
            ok_cand = ok_gt = None
            if padded:
                lengths = torch.tensor([sizes, gt_sizes], device=device)
                ok_cand = torch.arange(cand.shape[1], device=device) < lengths[0, :, None]
                ok_gt = torch.arange(gts.shape[1], device=device) < lengths[1, :, None]
            if valid is not None:
                ok_cand = _pad(list(valid)) if ok_cand is None else ok_cand & _pad(list(valid))
            ok = ok_cand[:, None, :] if ok_gt is None else ok_gt[:, :, None] & ok_cand[:, None, :]
            overlaps = torch.where(ok, overlaps, overlaps.new_tensor(-1.0))
        labels = None if gt_labels is None else _pad([lab.to(device=device, dtype=torch.long) for lab in gt_labels])
        result = self.assign_wrt_overlaps(overlaps, labels)
        per_image = zip(*(_unpad(r, sizes) for r in (result.gt_inds, result.max_overlaps, result.labels)))
        return [AssignResult(g, *r) for g, r in zip(gt_sizes, per_image)]

    def assign_wrt_overlaps(self, overlaps: Tensor, gt_labels: Tensor | None = None) -> AssignResult:
        """Assignment from a (num_gts, num_candidates) overlap matrix (mmdet's ``assign_wrt_overlaps``), in
        fixed-shape tensor arithmetic: no host-device sync. Leading dims (B, G, N) batch images of at least
        one gt and one candidate (``gt_labels`` (B, G))."""
        num_gts, num_boxes = overlaps.shape[-2:]
        device = overlaps.device
        if num_gts == 0 or num_boxes == 0:
            gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
            # No gts: everything is background, crowd boxes included (mmdet returns before the ignore rule).
            if num_gts == 0:
                gt_inds.zero_()
            return AssignResult(num_gts, gt_inds, overlaps.new_zeros((num_boxes,)),
                                torch.full((num_boxes,), -1, dtype=torch.long, device=device))

        max_overlaps, argmax = overlaps.max(dim=-2)
        gt_max_overlaps, gt_argmax = overlaps.max(dim=-1)

        if isinstance(self.neg_iou_thr, tuple):
            low, high = self.neg_iou_thr
            neg = (max_overlaps >= low) & (max_overlaps < high)
        else:
            neg = (max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)
        gt_inds = torch.where(max_overlaps >= self.pos_iou_thr, argmax + 1, neg.long() - 1)

        if self.match_low_quality:
            # mmdet loops over the gts and a later gt overrides an earlier one on a shared best candidate:
            # the candidate goes to the LAST gt that claims it.
            if self.gt_max_assign_all:
                claims = overlaps == gt_max_overlaps[..., None]
            else:
                claims = torch.arange(num_boxes, device=device) == gt_argmax[..., None]
            claims = claims & (gt_max_overlaps >= self.min_pos_iou)[..., None]
            last = num_gts - 1 - claims.flip(-2).to(torch.uint8).argmax(dim=-2)
            gt_inds = torch.where(claims.any(dim=-2), last + 1, gt_inds)

        pos = gt_inds > 0
        if gt_labels is None:
            labels = pos.long() - 1  # 0 (the RPN's one class) or -1
        else:
            gt_labels = gt_labels.to(device=device, dtype=torch.long)
            labels = torch.where(pos, torch.gather(gt_labels, -1, (gt_inds - 1).clamp(min=0)), -1)
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)


def _pad(rows: Sequence[Tensor]) -> Tensor:
    # a stack when every image has as many rows (the usual case: fixed proposal counts), else zero padding
    if all(r.shape[0] == rows[0].shape[0] for r in rows):
        return torch.stack(list(rows))
    return pad_sequence(list(rows), batch_first=True)


def _unpad(batched: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    if all(n == batched.shape[1] for n in sizes):
        return list(batched.unbind(0))
    return [batched[i, :n] for i, n in enumerate(sizes)]


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
