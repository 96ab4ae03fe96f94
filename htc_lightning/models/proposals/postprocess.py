"""What the plain RPN and GA-RPN do to their raw outputs at the end: keep the best-scored anchors of a level,
decode, drop tiny boxes, NMS (mmdet's ``RPNHead._predict_by_feat_single`` / ``_bbox_post_process`` and
``GARPNHead._predict_by_feat_single``), and TTA's merge of several views' proposals."""
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import nms

from ..layers.box_coder import BoxCoder
from ..layers.nms import mmcv_batched_nms
from ..layers.tracing import exporting, known_empty

# How the best ``nms_pre`` scores are picked. The two agree on the set except among scores tied at the cut and
# may order tied scores differently; each head uses its mmdet head's rule so that the same inputs keep the
# same anchors: "sort" (RPNHead: a descending sort, then the first k) or "topk" (GuidedAnchorHead: torch.topk).
TieRule = Literal["sort", "topk"]


def top_scores(scores: Tensor, k: int, ties: TieRule) -> tuple[Tensor, Tensor | None]:
    """The ``k`` best of ``scores`` along the last dim, best first, as (values, indices); all of them, in place,
    when ``k <= 0`` or there are no more than ``k`` (indices None then: nothing to gather)."""
    if k > 0 and exporting():
        return _traced_top_scores(scores, k, ties)
    if not 0 < k < scores.shape[-1]:
        return scores, None
    if ties == "sort":
        values, order = scores.sort(dim=-1, descending=True)
        return values[..., :k], order[..., :k]
    if ties == "topk":
        return scores.topk(k, dim=-1)
    raise ValueError(f"top_scores: ties {ties!r} is not 'sort' (mmdet's RPNHead) or 'topk' (GuidedAnchorHead)")


def _traced_top_scores(scores: Tensor, k: int, ties: TieRule) -> tuple[Tensor, Tensor]:
    """``top_scores`` for a graph that must hold whether or not a level has more than ``k`` scores (its size
    follows the image's, or a location filter's count): both cases are computed and the one that applies is
    selected, so a level with at most ``k`` keeps its scores in place, as in eager mode."""
    n = scores.shape[-1]
    # min(k, n) as a size the graph reads when it runs: a slice [:k] (or a symbolic min) guards on k < n, which
    # ties the graph to the traced image size
    kept = torch.full((), n, device=scores.device).clamp(max=k).item()
    torch._check(kept >= 0)
    torch._check(kept <= n)
    if ties == "sort":
        order = scores.sort(dim=-1, descending=True).indices.narrow(-1, 0, kept)
    elif ties == "topk":
        order = scores.topk(kept, dim=-1).indices
    else:
        raise ValueError(f"top_scores: ties {ties!r} is not 'sort' (mmdet's RPNHead) or 'topk' (GuidedAnchorHead)")
    in_place = torch.arange(kept, device=scores.device).expand_as(order)
    cut = torch.full((), n, device=scores.device) > k
    order = torch.where(cut, order, in_place)
    return torch.gather(scores, -1, order), order


def decode_and_suppress(coder: BoxCoder, anchors: Tensor, deltas: Tensor, scores: Tensor, img_size: tuple[int, int],
                        min_bbox_size: float, iou_threshold: float, max_num: int,
                        level_ids: Tensor | None = None, num_levels: int | None = None) -> Tensor:
    """One image's anchors (N, 4), deltas (N, 4) and objectness (N,) -> proposals (K, 5) [x1, y1, x2, y2, score]
    by decreasing score: decode clipped to ``img_size``, drop boxes not wider and taller than ``min_bbox_size``
    (so with 0 degenerate boxes go; a negative size keeps all), NMS, the best ``max_num``.

    ``level_ids`` (N,) makes the NMS per level at once (mmdet's RPNHead: ``batched_nms`` with the level as
    the class, ``num_levels`` of them); without them the boxes are one level's (GARPNHead's per-level ``nms``)."""
    boxes = coder.decode(anchors, deltas, max_shape=img_size)
    if min_bbox_size >= 0:
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        # one nonzero for the gathers (a boolean index each would wait for the device every time)
        keep = ((w > min_bbox_size) & (h > min_bbox_size)).nonzero().squeeze(1)
        boxes, scores = boxes[keep], scores[keep]
        level_ids = None if level_ids is None else level_ids[keep]
    if known_empty(boxes.shape[0]):
        return boxes.new_zeros(0, 5)
    if level_ids is None:
        keep = nms(boxes, scores, float(iou_threshold))
    else:
        keep = mmcv_batched_nms(boxes, scores, level_ids, iou_threshold, num_classes=num_levels)
    keep = keep[:max_num]
    return torch.cat([boxes[keep], scores[keep, None]], dim=1)


def merge_view_proposals(proposals: Sequence[Tensor], iou_threshold: float, max_num: int) -> Tensor:
    """Per-view (N_v, 5) proposals of one image, already in one frame -> class-agnostic NMS, the best
    ``max_num`` by score (mmdet's ``merge_aug_proposals``). A single view is returned as is: mmdet 2.x sends a
    one-view test through plain inference, whose proposals are NMSed per level only."""
    if len(proposals) == 0:
        raise ValueError("merge_view_proposals: no views to merge")
    if len(proposals) == 1:
        return proposals[0]
    merged = torch.cat(list(proposals))
    keep = nms(merged[:, :4].float(), merged[:, 4].float(), float(iou_threshold))  # by decreasing score
    return merged[keep[:max_num]]
