"""Loss functions with mmdet's reductions: element losses times ``weight``, then ``sum / avg_factor``
(``avg_factor + finfo(float32).eps`` as mmdet's ``weight_reduce_loss``) or a plain mean when no avg_factor."""
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

# mmdet's weight_reduce_loss guards the division with float32's machine epsilon, whatever the loss dtype.
_EPS = torch.finfo(torch.float32).eps


def weight_reduce(loss: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None) -> Tensor:
    """Element-wise ``weight``, then a mean (no ``avg_factor``) or ``sum / (avg_factor + eps)``."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean()
    return loss.sum() / (avg_factor + _EPS)


def _zero_if_no_weight(loss: Tensor, pred: Tensor, weight: Tensor | None) -> Tensor:
    # mmdet's box losses short-circuit to a graph-connected zero when every weight is zero (no positives),
    # which also avoids 0 / eps noise and NaNs from degenerate boxes that carry no weight. Chosen on the
    # device (both values are cheap), so no sync asks the host whether there are positives.
    if weight is None:
        return loss
    if pred.dim() == weight.dim() + 1:
        weight = weight.unsqueeze(1)
    return torch.where((weight > 0).any(), loss, (pred * weight).sum().to(loss.dtype))


def _empty_regression(name: str, pred: Tensor, target: Tensor) -> Tensor | None:
    """The loss of a box regression without targets, or None when there are targets to regress to.

    No target gives mmdet's ``pred.sum() * 0``, a zero still connected to ``pred``'s graph, so backward reaches
    the same parameters whether or not an image has boxes; otherwise ``pred`` and ``target`` must have the same
    shape, and the message names the loss that got them.
    """
    if target.numel() == 0:
        return pred.sum() * 0
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return None


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0, weight: Tensor | None = None,
                   avg_factor: float | Tensor | None = None) -> Tensor:
    if beta <= 0:
        raise ValueError(f"smooth_l1_loss: beta must be positive, got {beta}")
    if (empty := _empty_regression("smooth_l1_loss", pred, target)) is not None:
        return empty
    # mmdet's element loss, 0.5 * d**2 / beta below beta and d - 0.5 * beta above: bit-equal in float32
    loss = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    return _zero_if_no_weight(weight_reduce(loss, weight, avg_factor), pred, weight)


def l1_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None,
            avg_factor: float | Tensor | None = None) -> Tensor:
    if (empty := _empty_regression("l1_loss", pred, target)) is not None:
        return empty
    return _zero_if_no_weight(weight_reduce(F.l1_loss(pred, target, reduction="none"), weight, avg_factor), pred,
                              weight)


def cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None = None, avg_factor: float | None = None,
                  ignore_index: int = -100, avg_non_ignore: bool = False) -> Tensor:
    """Softmax CE per element (``reduction='none'``) then mmdet's reduction. With ``avg_non_ignore=False``
    (mmdet's default) a plain mean divides by all elements, ignored ones included."""
    loss = F.cross_entropy(logits, labels, reduction="none", ignore_index=ignore_index)
    if avg_factor is None and avg_non_ignore:
        avg_factor = labels.numel() - int((labels == ignore_index).sum())
    if weight is not None:
        weight = weight.float()
    return weight_reduce(loss, weight, avg_factor)


def binary_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None = None,
                         avg_factor: float | None = None) -> Tensor:
    """Sigmoid BCE on logits; ``labels`` of the same shape (float) as mmdet's ``use_sigmoid`` CrossEntropyLoss."""
    if logits.shape != labels.shape:
        raise ValueError(f"binary_cross_entropy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "must have the same shape (one-hot expansion is not supported)")
    # mmdet zeroes the weight of negative labels (its ignore convention for same-shape labels)
    valid = (labels >= 0).float()
    weight = valid if weight is None else weight.float() * valid
    loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    return weight_reduce(loss, weight, avg_factor)


def mask_cross_entropy(mask_logits: Tensor, mask_targets: Tensor, labels: Tensor) -> Tensor:
    """(P, C, M, M) per-class logits, (P, M, M) targets, (P,) labels: BCE on each RoI's gt-class channel, mean
    (mmdet's ``use_mask=True``); 0 * logits.sum() when there is no positive."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
    pred = mask_logits[rows, labels]
    return F.binary_cross_entropy_with_logits(pred, mask_targets.to(pred.dtype), reduction="mean")


def focal_loss(logits: Tensor, targets: Tensor, weight: Tensor | None = None, alpha: float = 0.25,
               gamma: float = 2.0, avg_factor: float | None = None) -> Tensor:
    """Sigmoid focal loss (torchvision's ``sigmoid_focal_loss``, reduction none) then mmdet's reduction.

    ``targets`` of the logits' shape (0/1), or integer class labels (N,) for (N, C) logits where label C is
    background, expanded as mmdet's ``FocalLoss`` does (so with C = 1, label 0 is the positive one)."""
    if targets.dim() == logits.dim() - 1 and not targets.is_floating_point():
        num_classes = logits.shape[-1]
        targets = F.one_hot(targets, num_classes + 1)[..., :num_classes]
    if logits.shape != targets.shape:
        raise ValueError(f"focal_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    loss = sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none")
    if weight is not None and weight.shape != loss.shape:
        # as mmdet: a per-prior weight (N,) broadcasts over the class axis of (N, C)
        if weight.shape[0] == loss.shape[0]:
            weight = weight.reshape(loss.shape[0], *([1] * (loss.dim() - 1)))
        else:
            weight = weight.reshape(loss.shape)
    return weight_reduce(loss, weight, avg_factor)


def bounded_iou_loss(pred: Tensor, target: Tensor, beta: float = 0.2, eps: float = 1e-3,
                     weight: Tensor | None = None, avg_factor: float | None = None) -> Tensor:
    """mmdet ``BoundedIoULoss`` (Guided Anchoring shape loss) on (N, 4) xyxy boxes."""
    pred_cx = (pred[:, 0] + pred[:, 2]) * 0.5
    pred_cy = (pred[:, 1] + pred[:, 3]) * 0.5
    pred_w = pred[:, 2] - pred[:, 0]
    pred_h = pred[:, 3] - pred[:, 1]
    with torch.no_grad():  # the target is a constant (Tychsen-Smith & Petersson, bounded IoU)
        tgt_cx = (target[:, 0] + target[:, 2]) * 0.5
        tgt_cy = (target[:, 1] + target[:, 3]) * 0.5
        tgt_w = target[:, 2] - target[:, 0]
        tgt_h = target[:, 3] - target[:, 1]
    dx = (tgt_cx - pred_cx).abs()
    dy = (tgt_cy - pred_cy).abs()
    zero_t = torch.zeros_like(dx)
    loss_dx = 1 - torch.max((tgt_w - 2 * dx) / (tgt_w + 2 * dx + eps), zero_t)
    loss_dy = 1 - torch.max((tgt_h - 2 * dy) / (tgt_h + 2 * dy + eps), zero_t)
    loss_dw = 1 - torch.min(tgt_w / (pred_w + eps), pred_w / (tgt_w + eps))
    loss_dh = 1 - torch.min(tgt_h / (pred_h + eps), pred_h / (tgt_h + eps))
    comb = torch.stack([loss_dx, loss_dy, loss_dw, loss_dh], dim=-1).flatten(1)
    loss = torch.where(comb < beta, 0.5 * comb * comb / beta, comb - 0.5 * beta)
    return _zero_if_no_weight(weight_reduce(loss, weight, avg_factor), pred, weight)
