"""Sampling of assigned candidates into a training mini-batch."""
from dataclasses import dataclass

from torch import Tensor

from .assigners import AssignResult


@dataclass
class SamplingResult:
    """Indices refer to the candidate list *after* gt boxes were prepended (when ``add_gt_as_proposals``)."""

    pos_inds: Tensor             # (P,) long
    neg_inds: Tensor             # (Q,) long
    pos_boxes: Tensor            # (P, 4)
    neg_boxes: Tensor            # (Q, 4)
    pos_gt_boxes: Tensor         # (P, 4) the gt box of each positive
    pos_gt_labels: Tensor        # (P,) long
    pos_assigned_gt_inds: Tensor  # (P,) long, 0-based gt index
    pos_is_gt: Tensor            # (P,) bool/uint8: the positive is a prepended gt box
    num_gts: int

    @property
    def boxes(self) -> Tensor:
        """(P + Q, 4): positives first, as mmdet's ``SamplingResult.priors``/``bboxes``."""
        raise NotImplementedError


class RandomSampler:
    """mmdet ``RandomSampler``: at most ``num * pos_fraction`` random positives, the rest of ``num`` negatives
    (``neg_pos_ub`` caps negatives at ub * positives when >= 0). ``num=None`` keeps every positive and
    negative in order (what mmdet does with a budget larger than the candidates: the loss-parity mode)."""

    def __init__(self, num: int | None, pos_fraction: float, neg_pos_ub: int = -1,
                 add_gt_as_proposals: bool = True) -> None:
        raise NotImplementedError

    def sample(self, assign_result: AssignResult, boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor | None = None) -> SamplingResult:
        """May prepend ``gt_boxes`` to ``boxes`` (and ``assign_result.add_gt_``) before sampling."""
        raise NotImplementedError
