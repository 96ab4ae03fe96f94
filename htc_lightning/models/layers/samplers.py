"""Sampling of assigned candidates into a training mini-batch."""
from collections.abc import Sequence
from dataclasses import dataclass

import torch
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
        return torch.cat([self.pos_boxes, self.neg_boxes], dim=0)

    @property
    def avg_factor(self) -> int:
        """mmdet's loss normaliser for sampled heads: ``max(P, 1) + max(Q, 1)`` (its ``num_pos``/``num_neg``
        are floored at 1; the true counts are ``pos_inds.numel()``/``neg_inds.numel()``)."""
        return max(int(self.pos_inds.numel()), 1) + max(int(self.neg_inds.numel()), 1)


class RandomSampler:
    """mmdet ``RandomSampler``: at most ``num * pos_fraction`` random positives, the rest of ``num`` negatives
    (``neg_pos_ub`` caps negatives at ub * positives when >= 0). ``num=None`` keeps every positive and
    negative in order (what mmdet does with a budget larger than the candidates: the loss-parity mode).

    Sampled indices come back sorted ascending, as mmdet's (it calls ``unique()`` on them). Random draws use
    ``torch.randperm`` (positives first, then negatives, only when a set exceeds its budget), so with the same
    seed on CPU the picks are mmdet's.

    The sampled sizes are the only data-dependent shapes: the counts of positive and negative candidates
    come to the host in one transfer (``candidate_counts``, batched over images by callers that sample several
    at once), and every index set is then gathered with ``nonzero_static`` at its known size.
    """

    def __init__(self, num: int | None, pos_fraction: float, neg_pos_ub: int = -1,
                 add_gt_as_proposals: bool = True) -> None:
        if num is not None and num < 0:
            raise ValueError(f"RandomSampler: num must be >= 0 or None, got {num}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"RandomSampler: pos_fraction must lie in [0, 1], got {pos_fraction}")
        self.num = num
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = add_gt_as_proposals

    @staticmethod
    def candidate_counts(assign_results: Sequence[AssignResult]) -> list[tuple[int, int]]:
        """(positives, negatives) of each assignment, before any gt box is added: one host-device sync for all."""
        if not assign_results:
            return []
        flat = torch.stack([torch.stack([(a.gt_inds > 0).sum(), (a.gt_inds == 0).sum()]) for a in assign_results])
        return [(int(p), int(n)) for p, n in flat.tolist()]

    @staticmethod
    def _choose(mask: Tensor, count: int, budget: int | None) -> Tensor:
        candidates = torch.nonzero_static(mask, size=count).view(-1)
        if budget is None or count <= budget:
            return candidates
        perm = torch.randperm(count, device=candidates.device)[:budget]
        return candidates[perm].sort().values

    def sample(self, assign_result: AssignResult, boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor | None = None, counts: tuple[int, int] | None = None) -> SamplingResult:
        """May prepend ``gt_boxes`` to ``boxes`` (and ``assign_result.add_gt_``, in place) before sampling.
        Without ``gt_labels`` the gt boxes carry label 0 (RPN). ``counts``: this assignment's
        ``candidate_counts``, when the caller fetched them already."""
        boxes = boxes[:, :4]
        if boxes.shape[0] != assign_result.num_candidates:
            raise ValueError(f"RandomSampler: {boxes.shape[0]} boxes but the assignment covers "
                             f"{assign_result.num_candidates} candidates")
        num_pos, num_neg = counts if counts is not None else self.candidate_counts([assign_result])[0]
        is_gt = torch.zeros(boxes.shape[0], dtype=torch.uint8, device=boxes.device)
        num_gts = int(gt_boxes.shape[0])
        if self.add_gt_as_proposals and num_gts > 0:
            if gt_labels is None:
                gt_labels = torch.zeros(num_gts, dtype=torch.long, device=boxes.device)
            boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes], dim=0)
            assign_result.add_gt_(gt_labels)
            is_gt = torch.cat([torch.ones(num_gts, dtype=torch.uint8, device=boxes.device), is_gt])
            num_pos += num_gts  # every gt box is a positive of itself

        pos_budget = None if self.num is None else int(self.num * self.pos_fraction)
        pos_inds = self._choose(assign_result.gt_inds > 0, num_pos, pos_budget)
        neg_budget = None if self.num is None else self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            ub = int(self.neg_pos_ub * max(1, pos_inds.numel()))
            neg_budget = ub if neg_budget is None else min(neg_budget, ub)
        neg_inds = self._choose(assign_result.gt_inds == 0, num_neg, neg_budget)

        pos_assigned = assign_result.gt_inds[pos_inds] - 1
        if num_gts == 0:
            pos_gt_boxes = gt_boxes.new_zeros((0, 4))
        else:
            pos_gt_boxes = gt_boxes[pos_assigned]
        return SamplingResult(
            pos_inds=pos_inds, neg_inds=neg_inds, pos_boxes=boxes[pos_inds], neg_boxes=boxes[neg_inds],
            pos_gt_boxes=pos_gt_boxes, pos_gt_labels=assign_result.labels[pos_inds],
            pos_assigned_gt_inds=pos_assigned, pos_is_gt=is_gt[pos_inds], num_gts=num_gts)
