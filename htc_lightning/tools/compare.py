"""Comparing our numbers with a reference computed in another process, on another machine or device.

**Floats.** fp32 results differ between CPUs (AVX-512, AVX2 and scalar kernels sum in different orders),
thread counts and GPUs by rounding that grows with the magnitude of the tensor: a FishNet stage of random
weights reaching 1.45e6 differs by 0.84 between two CPUs, 6e-7 of its scale. So a difference is measured
against the reference tensor's scale, ``max|ours - ref| <= rtol * max|ref| + atol``, and reported normalised.

**Discrete decisions** (a score threshold, a top-k cut, NMS at an IoU threshold, GA-RPN's location filter)
flip where the reference value lies within that rounding of the boundary. Such a flip is accepted and
counted as a near-tie; any other disagreement fails. Exact equality is a claim only within one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou


@dataclass(frozen=True)
class Tolerance:
    """``|ours - ref| <= rtol * scale + atol`` with ``scale = max|ref|`` of the whole tensor."""

    rtol: float
    atol: float

    def bound(self, scale: float) -> float:
        return self.rtol * scale + self.atol


# Measured on the oracle and FishNet dumps with AVX2 kernels on 2 threads and scalar kernels
# (ATEN_CPU_CAPABILITY=default) on 1: normalised differences of fp32 activations reach 1.7e-6 (FishNet-99's
# stage 6, scalar), 1.4e-6 in the mmdet dumps; on an AVX-512 Xeon FishNet-150 differed by 8e-7. rtol keeps a
# 6x margin over that; atol covers tensors whose scale is ~0 (zero-initialised layers). A wrong weight or a
# wrong op moves outputs by 1e-3 of their scale or more.
FLOAT = Tolerance(rtol=1e-5, atol=1e-6)
# Scores are probabilities: a sigmoid moves by at most 1/4 of its logit's change, a softmax output by at most
# 1/2 of the largest change among its logits. Used where the logits' scale is unknown; `score_tolerance`
# derives the bound from it otherwise (logits of the oracle's --spread 20 dumps reach ~50: 2.5e-4).
SCORE_TOL = 2e-4
# Box corners agree to FLOAT of the image scale (~1e-5 x 1333 px = 0.013 px); for boxes of 8 px and more
# that moves an IoU by < 5e-3, so an NMS decision within this of its threshold is a near-tie.
IOU_TOL = 5e-3


def score_tolerance(logit_scale: float, slope: float = 0.5, tol: Tolerance = FLOAT) -> float:
    """How far a sigmoid (``slope`` 0.25) or softmax (0.5) score may move when its logits, of ``logit_scale``,
    are off by ``tol``'s bound."""
    return slope * tol.bound(logit_scale)


@dataclass(frozen=True)
class Diff:
    max_abs: float
    scale: float
    tol: Tolerance
    same_shape: bool = True

    @property
    def normalised(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    @property
    def ok(self) -> bool:
        return self.same_shape and self.max_abs <= self.tol.bound(self.scale)

    def __str__(self) -> str:
        if not self.same_shape:
            return "shapes differ"
        return f"max abs diff {self.max_abs:.3g} ({self.normalised:.1e} of scale {self.scale:.3g})"


def diff(ours: Tensor, ref: Tensor, tol: Tolerance = FLOAT, where: Tensor | None = None) -> Diff:
    """The largest difference of ``ours`` from ``ref`` (optionally only ``where`` is true), against the scale of
    the whole reference tensor."""
    if ours.shape != ref.shape:
        return Diff(math.inf, 0.0, tol, same_shape=False)
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    scale = float(b.abs().max()) if b.numel() else 0.0
    d = (a - b).abs()
    if where is not None:
        d = d[where.cpu()]
    return Diff(float(d.max()) if d.numel() else 0.0, scale, tol)


def assert_close_to_reference(ours: Tensor, ref: Tensor, tol: Tolerance = FLOAT, msg: str = "") -> Diff:
    """For tests: ``ours`` equals a reference computed elsewhere up to fp32 rounding at its scale."""
    assert ours.shape == ref.shape, f"{msg}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    d = diff(ours, ref, tol)
    assert d.ok, f"{msg}: {d}, allowed {tol.bound(d.scale):.3g} (rtol {tol.rtol:g} of scale + atol {tol.atol:g})"
    return d


@dataclass(frozen=True)
class Flips:
    """Positions where two sides took a threshold decision differently, judged on the reference's value."""

    count: int
    near_ties: int
    worst_distance: float  # the reference value's largest distance to the boundary among the flips

    @property
    def ok(self) -> bool:
        return self.count == self.near_ties

    def __str__(self) -> str:
        if not self.count:
            return "no decision flipped"
        return (f"{self.count} flipped ({self.near_ties} near-ties), reference at most "
                f"{self.worst_distance:.2g} from the threshold")


def threshold_flips(ours: Tensor, ref: Tensor, threshold: float, ref_threshold: float | None = None,
                    tol: Tolerance = FLOAT) -> tuple[Tensor, Flips]:
    """Where ``ours >= threshold`` and ``ref >= ref_threshold`` (default: the same) disagree. A flip is a
    near-tie when the reference value lies within ``tol`` (at the reference's scale) of its threshold.
    Returns (the mask of positions decided alike, Flips)."""
    ref_threshold = threshold if ref_threshold is None else ref_threshold
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    flipped = (a >= threshold) != (b >= ref_threshold)
    dist = (b[flipped] - ref_threshold).abs()
    bound = tol.bound(float(b.abs().max()) if b.numel() else 0.0)
    return ~flipped, Flips(int(flipped.sum()), int((dist <= bound).sum()),
                           float(dist.max()) if dist.numel() else 0.0)


def match_boxes(ref_boxes: Tensor, ref_scores: Tensor, ours_boxes: Tensor, ours_scores: Tensor,
                ref_labels: Tensor | None = None, ours_labels: Tensor | None = None, iou_thr: float = 0.99,
                score_tol: float = SCORE_TOL) -> list[tuple[int, int]]:
    """One-to-one matches (ref index, our index): same label, IoU > ``iou_thr``, scores within ``score_tol``;
    reference boxes in descending score order each take their best free candidate."""
    if len(ref_boxes) == 0 or len(ours_boxes) == 0:
        return []
    iou = box_iou(ref_boxes.double().cpu(), ours_boxes.double().cpu())
    ok = (iou > iou_thr) & ((ref_scores.double().cpu()[:, None] - ours_scores.double().cpu()[None]).abs()
                            <= score_tol)
    if ref_labels is not None and ours_labels is not None:
        ok &= ref_labels.cpu()[:, None] == ours_labels.cpu()[None]
    cand = torch.where(ok, iou, torch.full_like(iou, -1.0))
    pairs = []
    for r in torch.argsort(ref_scores.cpu(), descending=True).tolist():
        j = int(cand[r].argmax())
        if cand[r, j] > 0:
            pairs.append((r, j))
            cand[:, j] = -1.0
    return pairs


@dataclass(frozen=True)
class SetComparison:
    """Two kept sets (boxes after threshold / top-k / NMS decisions) compared one to one, tie-aware."""

    matched: int
    ref_count: int
    ours_count: int
    near_ties: int  # unmatched boxes, on either side, explained by a decision near its boundary
    unexplained: int
    pairs: list[tuple[int, int]]

    @property
    def ok(self) -> bool:
        return self.unexplained == 0

    def __str__(self) -> str:
        return (f"{self.matched}/{self.ref_count} matched one to one (ours {self.ours_count}), "
                f"{self.near_ties} near-ties, {self.unexplained} unexplained")


def compare_kept_sets(ref_boxes: Tensor, ref_scores: Tensor, ours_boxes: Tensor, ours_scores: Tensor,
                      ref_labels: Tensor | None = None, ours_labels: Tensor | None = None, *,
                      nms_iou: float | None = None, score_thr: float | None = None,
                      top_k: int | None = None, score_tol: float = SCORE_TOL,
                      iou_tol: float = IOU_TOL) -> SetComparison:
    """Match the sets; then each unmatched box (ours or the reference's) must be explained by a near-tie:
    - its score lies within ``score_tol`` of ``score_thr`` or, when the other side holds ``top_k`` boxes, of
      that side's lowest kept score (a top-k cut);
    - a higher-scoring box of the same label (on either side) overlaps it with IoU within ``iou_tol`` of
      ``nms_iou`` (an NMS decision at its boundary);
    - a box of the same label whose score is within ``score_tol`` of its own overlaps it above
      ``nms_iou - iou_tol`` (an NMS order at its boundary: whichever of the two ranks first suppresses the
      other, and rounding ranks scores that close either way; identical anchors on a flat background score
      exactly alike);
    - or it overlaps, above ``nms_iou - iou_tol``, a higher-scoring unmatched box already explained (the
      other side kept or dropped that box, which then suppressed or spared this one).
    """
    pairs = match_boxes(ref_boxes, ref_scores, ours_boxes, ours_scores, ref_labels, ours_labels,
                        score_tol=score_tol)
    n_ref, n_ours = len(ref_boxes), len(ours_boxes)

    def labels_or_zeros(lab: Tensor | None, n: int) -> Tensor:
        return lab.cpu().long() if lab is not None else torch.zeros(n, dtype=torch.long)

    boxes = torch.cat([ref_boxes.double().cpu().reshape(-1, 4), ours_boxes.double().cpu().reshape(-1, 4)])
    scores = torch.cat([ref_scores.double().cpu().reshape(-1), ours_scores.double().cpu().reshape(-1)])
    labels = torch.cat([labels_or_zeros(ref_labels, n_ref), labels_or_zeros(ours_labels, n_ours)])
    matched = torch.zeros(n_ref + n_ours, dtype=torch.bool)
    for r, j in pairs:
        matched[r] = matched[n_ref + j] = True
    # a top-k cut: a box that one side kept and the other, holding k boxes, dropped for one of equal score
    other_cut = [float(s.min()) if top_k is not None and n >= top_k and n else None
                 for s, n in ((ours_scores, n_ours), (ref_scores, n_ref))]
    side = torch.cat([torch.zeros(n_ref, dtype=torch.long), torch.ones(n_ours, dtype=torch.long)])

    iou = box_iou(boxes, boxes) if len(boxes) else torch.zeros(0, 0, dtype=torch.float64)
    same_label = labels[:, None] == labels[None]
    explained = torch.zeros_like(matched)
    for i in torch.argsort(scores, descending=True).tolist():
        if matched[i]:
            continue
        s = float(scores[i])
        cuts = [c for c in (score_thr, other_cut[int(side[i])]) if c is not None]
        higher = (scores > s) & same_label[i]
        near_cut = any(abs(s - c) <= score_tol for c in cuts)
        near_nms = nms_iou is not None and bool(((iou[i] - nms_iou).abs() <= iou_tol)[higher].any())
        tied = ((scores - s).abs() <= score_tol) & same_label[i]
        tied[i] = False
        near_order = nms_iou is not None and bool((iou[i] > nms_iou - iou_tol)[tied].any())
        cascade = nms_iou is not None and bool((iou[i] > nms_iou - iou_tol)[higher & explained].any())
        explained[i] = near_cut or near_nms or near_order or cascade
    unmatched = ~matched
    return SetComparison(len(pairs), n_ref, n_ours, int((unmatched & explained).sum()),
                         int((unmatched & ~explained).sum()), pairs)


def mask_iou(a: Tensor, b: Tensor) -> float:
    a, b = a.bool().cpu(), b.bool().cpu()
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
