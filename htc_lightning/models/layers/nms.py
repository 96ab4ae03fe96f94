"""NMS: mmcv's per-class batched NMS, mmdet's ``multiclass_nms``, and Soft-NMS."""
import torch
from torch import Tensor
from torchvision.ops import nms

from .tracing import exporting, known_empty

_SOFT_METHODS = ("linear", "gaussian", "naive")


def _class_offsets(boxes: Tensor, idxs: Tensor) -> Tensor:
    # mmcv's coordinate trick: shift each class by (max coordinate + 1) so classes never overlap. Matching it
    # (rather than torchvision's per-class loop above 1000 boxes) keeps float rounding, hence borderline IoUs,
    # identical to mmdet's.
    # in float32: class offsets reach ~80 * 1334, past fp16's range
    boxes = boxes.float()
    if known_empty(boxes.numel()):
        return boxes
    if exporting():
        # the traced graph must also run on zero boxes, where max() has no value; every exported caller's
        # boxes are clipped to the image (>= 0), so a 0 added to the set leaves the maximum as it is
        max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    else:
        max_coordinate = boxes.max()
    return boxes + (idxs.to(boxes) * (max_coordinate + 1))[:, None]


def mmcv_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, class_agnostic: bool = False,
                     split_thr: int = 10000, num_classes: int | None = None) -> Tensor:
    """Indices kept, sorted by decreasing score: what torchvision's ``batched_nms`` keeps, computed as mmcv's
    ``batched_nms`` computes it (hence the name and the extra arguments). Below ``split_thr`` boxes one torchvision
    ``nms`` on class-offset boxes, otherwise one ``nms`` per class; ``class_agnostic`` ignores ``idxs``.
    ``num_classes`` (when ``idxs`` lie in 0..num_classes-1) saves reading the largest class id from the device."""
    if known_empty(boxes.shape[0]):
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if class_agnostic:
        return nms(boxes.float(), scores.float(), float(iou_threshold))
    shifted = _class_offsets(boxes, idxs)
    if exporting():
        return _traced_mmcv_batched_nms(shifted, scores, idxs, iou_threshold, split_thr, num_classes)
    if boxes.shape[0] < split_thr:
        return nms(shifted, scores.float(), float(iou_threshold))
    # the boxes grouped by class with one host transfer of the group sizes (not a unique and a nonzero per
    # class, each waiting for the device); a stable sort keeps each class's boxes in index order, as nonzero
    labels = idxs.long()
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    counts = torch.zeros(num_classes, dtype=torch.long, device=labels.device).scatter_add_(
        0, labels, torch.ones_like(labels)).tolist()
    order = torch.argsort(labels, stable=True)
    kept, start = [], 0
    for count in counts:
        if count == 0:
            continue
        members = order[start:start + count]
        start += count
        kept.append(members[nms(shifted[members], scores[members].float(), float(iou_threshold))])
    keep = torch.cat(kept)
    return _by_score(keep, scores[keep])[0]


def _traced_mmcv_batched_nms(shifted: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, split_thr: int,
                        num_classes: int | None) -> Tensor:
    """``mmcv_batched_nms`` in a graph, where the count of boxes is known only when it runs: both of mmcv's paths
    are traced, each fed the boxes only when it is the one that applies (the other gets none), and the kept
    indices are put in ``_by_score`` order, which is also torchvision's ``nms`` order (a stable descending
    sort of the scores), so the result equals eager mode's either way."""
    if num_classes is None:
        raise ValueError("mmcv_batched_nms: exporting needs num_classes (the graph cannot read the largest class id)")
    n = shifted.shape[0]
    scores = scores.float()
    small = torch.full((), n, device=shifted.device) < split_thr
    num_small = torch.where(small, n, 0).item()
    torch._check(num_small >= 0)
    torch._check(num_small <= n)
    kept = [nms(shifted[:num_small], scores[:num_small], float(iou_threshold))]
    labels = idxs[num_small:].long()
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        kept.append(members[nms(shifted[num_small:][members], scores[num_small:][members], float(iou_threshold))])
    keep = torch.cat(kept)
    return _by_score(keep, scores[keep])[0]


def _by_score(inds: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Sort by decreasing score, ties by increasing index (the order a greedy pass over all boxes picks them)."""
    by_index = inds.argsort()
    inds, scores = inds[by_index], scores[by_index]
    if exporting():
        # ONNX has no stable sort; its TopK orders equal values by index, which is what the stable sort gives
        return _by_score_traced(inds, scores)
    by_score = scores.sort(descending=True, stable=True).indices
    return inds[by_score], scores[by_score]


def _by_score_traced(inds: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    by_score = scores.topk(scores.shape[0]).indices
    return inds[by_score], scores[by_score]


def _soft_nms_padded(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float, sigma: float,
                     min_score: float, method: str) -> tuple[Tensor, Tensor]:
    """Soft-NMS run on G independent groups at once: ``boxes`` (G, M, 4), ``scores`` (G, M), ``valid`` (G, M).
    One iteration selects the best alive box of every group and decays the rest of that group, so the loop
    runs (max kept per group) times. Returns per-entry decayed scores and kept flags, both (G, M)."""
    num_groups, num = scores.shape
    scores = scores.float().clone()
    boxes = boxes.float()
    alive = valid.clone()
    kept = torch.zeros_like(valid)
    rows = torch.arange(num_groups, device=scores.device)
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    coords = tuple(boxes[..., i].contiguous() for i in range(4))
    area = (coords[2] - coords[0]) * (coords[3] - coords[1])
    for _ in range(num):
        masked = torch.where(alive, scores, neg_inf)
        best = masked.argmax(dim=1)
        active = alive[rows, best]
        if not bool(active.any()):
            break
        # Only groups that still have a candidate select one this round.
        kept[rows[active], best[active]] = True
        alive[rows[active], best[active]] = False
        sel_boxes = boxes[rows, best]                                     # (G, 4)
        iou = _iou_one_to_many(sel_boxes, coords, area)                   # (G, M)
        if method == "linear":
            decay = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
        elif method == "gaussian":
            decay = torch.exp(-(iou * iou) / sigma)
        else:
            decay = torch.where(iou > iou_threshold, torch.zeros_like(iou), torch.ones_like(iou))
        update = alive & active[:, None]
        scores = torch.where(update, scores * decay, scores)
        # mmcv drops a box as soon as a decay takes it under min_score; later boxes cannot revive it.
        alive = alive & ~(update & (scores < min_score))
    return scores, kept


def _iou_one_to_many(sel: Tensor, coords: tuple[Tensor, Tensor, Tensor, Tensor], area: Tensor) -> Tensor:
    """IoU of ``sel`` (G, 4) with the boxes of its group, given as x1, y1, x2, y2 (G, M) and their areas, in
    ``box_iou``'s arithmetic."""
    x1, y1, x2, y2 = coords
    sx1, sy1, sx2, sy2 = (sel[:, i, None] for i in range(4))
    iw = (torch.min(sx2, x2) - torch.max(sx1, x1)).clamp_(min=0)
    ih = (torch.min(sy2, y2) - torch.max(sy1, y1)).clamp_(min=0)
    inter = iw * ih
    return inter / ((sx2 - sx1) * (sy2 - sy1) + area - inter)


def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
             min_score: float = 1e-3, method: str = "linear") -> tuple[Tensor, Tensor]:
    """Bodla et al. 2017 with mmcv's semantics (``method`` 'linear' | 'gaussian' | 'naive').
    Returns (kept indices, their decayed scores), by decreasing decayed score."""
    if method not in _SOFT_METHODS:
        raise ValueError(f"soft_nms: method {method!r} is not one of {_SOFT_METHODS}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device), scores.new_zeros(0)
    valid = torch.ones(1, boxes.shape[0], dtype=torch.bool, device=boxes.device)
    decayed, kept = _soft_nms_padded(boxes[None], scores[None], valid, iou_threshold, sigma, min_score, method)
    inds = kept[0].nonzero().squeeze(1)
    inds, kept_scores = _by_score(inds, decayed[0, inds])
    return inds, kept_scores.to(scores.dtype)


def batched_soft_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
                     min_score: float = 1e-3, method: str = "linear", split_thr: int = 10000
                     ) -> tuple[Tensor, Tensor]:
    """Soft-NMS per class, all classes in one padded loop. Returns (kept indices, decayed scores) by decreasing
    decayed score, as mmcv's ``batched_nms`` with ``type='soft_nms'``."""
    if method not in _SOFT_METHODS:
        raise ValueError(f"batched_soft_nms: method {method!r} is not one of {_SOFT_METHODS}")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device), scores.new_zeros(0)
    classes, group = torch.unique(idxs, return_inverse=True)
    counts = torch.bincount(group, minlength=len(classes))
    order = torch.argsort(group, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(order)
    slot[order] = torch.arange(n, device=boxes.device) - starts[group[order]]
    num_groups, width = len(classes), int(counts.max())
    padded_boxes = boxes.new_zeros(num_groups, width, 4, dtype=torch.float32)
    padded_scores = scores.new_zeros(num_groups, width, dtype=torch.float32)
    valid = torch.zeros(num_groups, width, dtype=torch.bool, device=boxes.device)
    source = torch.full((num_groups, width), -1, dtype=torch.long, device=boxes.device)
    padded_boxes[group, slot] = boxes.float()
    padded_scores[group, slot] = scores.float()
    valid[group, slot] = True
    source[group, slot] = torch.arange(n, device=boxes.device)
    if n < split_thr:
        # Below split_thr mmcv runs one soft-NMS over class-offset boxes: after its very first pick every other
        # box is checked against min_score, so only the overall best box escapes that check.
        first = int(scores.argmax())
        low = (padded_scores < min_score) & valid
        low[group[first], slot[first]] = False
        valid = valid & ~low
    decayed, kept = _soft_nms_padded(padded_boxes, padded_scores, valid, iou_threshold, sigma, min_score, method)
    inds, kept_scores = _by_score(source[kept], decayed[kept])
    return inds, kept_scores.to(scores.dtype)


def multiclass_nms(boxes: Tensor, scores: Tensor, score_thr: float, iou_threshold: float, max_num: int = -1,
                   nms_type: str = "nms", soft_sigma: float = 0.5, soft_min_score: float = 1e-3
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mmdet ``multiclass_nms``: ``boxes`` (N, 4) shared or (N, C, 4) per class, ``scores`` (N, C) without
    the background column. Keeps (box, class) pairs with score > score_thr, NMS per class (``nms_type``
    'nms' | 'soft_nms_linear' | 'soft_nms_gaussian' | 'soft_nms_naive'), then the top ``max_num``.
    Returns (boxes (K, 4), scores (K,), labels (K,), index of the source row (K,))."""
    num_rows, num_classes = scores.shape
    if boxes.dim() == 2 and boxes.shape[1] == 4:
        per_class = boxes[:, None].expand(num_rows, num_classes, 4)
    elif boxes.dim() == 3 or (boxes.dim() == 2 and boxes.shape[1] == 4 * num_classes):
        per_class = boxes.reshape(num_rows, num_classes, 4)
    else:
        raise ValueError(f"multiclass_nms: boxes {tuple(boxes.shape)} fit neither (N, 4) nor (N, {num_classes}, 4)")
    flat_boxes = per_class.reshape(-1, 4)
    flat_scores = scores.reshape(-1)
    flat_labels = torch.arange(num_classes, device=scores.device).repeat(num_rows)
    # strict '>' as mmdet
    inds = (flat_scores > score_thr).nonzero().squeeze(1)
    flat_boxes, flat_scores, flat_labels = flat_boxes[inds], flat_scores[inds], flat_labels[inds]
    if known_empty(inds.numel()):
        return flat_boxes, flat_scores, flat_labels, inds // max(num_classes, 1)
    if nms_type == "nms":
        keep = mmcv_batched_nms(flat_boxes, flat_scores, flat_labels, iou_threshold, num_classes=num_classes)
        kept_scores = flat_scores[keep]
    elif nms_type.startswith("soft_nms_"):
        keep, kept_scores = batched_soft_nms(flat_boxes, flat_scores, flat_labels, iou_threshold, soft_sigma,
                                             soft_min_score, nms_type[len("soft_nms_"):])
    else:
        raise ValueError(f"multiclass_nms: nms_type {nms_type!r} is not 'nms', 'soft_nms_linear', "
                         "'soft_nms_gaussian' or 'soft_nms_naive'")
    if max_num > 0:
        keep, kept_scores = keep[:max_num], kept_scores[:max_num]
    return flat_boxes[keep], kept_scores, flat_labels[keep], inds[keep] // num_classes
