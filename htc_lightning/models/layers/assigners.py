"""Target assignment: which gt box (if any) each candidate box learns from."""
from dataclasses import dataclass

from torch import Tensor


@dataclass
class AssignResult:
    """``gt_inds``: (N,) long, -1 ignore, 0 negative, k > 0 positive for gt ``k - 1`` (mmdet's convention).
    ``max_overlaps``: (N,) IoU with the assigned/best gt. ``labels``: (N,) long, gt label of positives, -1 elsewhere."""

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    def add_gt_(self, gt_labels: Tensor) -> None:
        """Prepend the gt boxes themselves as positives (for ``add_gt_as_proposals``)."""
        raise NotImplementedError


class MaxIoUAssigner:
    """mmdet ``MaxIoUAssigner``: neg if max IoU in [0, neg_iou_thr) (or in the range if a tuple), pos if
    >= pos_iou_thr, then (``match_low_quality``) every gt takes its best candidates if that IoU >= min_pos_iou
    (all ties when ``gt_max_assign_all``). Candidates whose IoF with a crowd/ignore box exceeds
    ``ignore_iof_thr`` become -1."""

    def __init__(self, pos_iou_thr: float, neg_iou_thr: float | tuple[float, float], min_pos_iou: float = 0.0,
                 match_low_quality: bool = True, gt_max_assign_all: bool = True, ignore_iof_thr: float = -1.0,
                 ignore_wrt_candidates: bool = True) -> None:
        raise NotImplementedError

    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               gt_boxes_ignore: Tensor | None = None) -> AssignResult:
        raise NotImplementedError


class ApproxMaxIoUAssigner(MaxIoUAssigner):
    """mmdet ``ApproxMaxIoUAssigner`` (Guided Anchoring shape targets): the IoU of a location with a gt is the
    max over its ``approxs_per_octave`` approx anchors; assignment is then MaxIoU on the squares."""

    def assign_approx(self, approxs: Tensor, squares: Tensor, approxs_per_octave: int, gt_boxes: Tensor,
                      gt_labels: Tensor | None = None, gt_boxes_ignore: Tensor | None = None) -> AssignResult:
        """``approxs``: (N * approxs_per_octave, 4) laid out as mmdet's (location-major); ``squares``: (N, 4)."""
        raise NotImplementedError
