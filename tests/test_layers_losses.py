import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from htc_lightning.models.layers.losses import (
    binary_cross_entropy,
    bounded_iou_loss,
    cross_entropy,
    focal_loss,
    l1_loss,
    mask_cross_entropy,
    smooth_l1_loss,
)

FIXTURE = Path(__file__).parent / "fixtures" / "layers" / "mmdet_layers.pt"
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def mmdet_losses():
    return torch.load(FIXTURE, weights_only=False)["losses"]


def test_smooth_l1_is_quadratic_below_beta_and_linear_above():
    pred = torch.tensor([0.0, 0.05, 2.0])
    loss = smooth_l1_loss(pred, torch.zeros(3), beta=0.1)
    expected = (0.0 + 0.5 * 0.05 ** 2 / 0.1 + (2.0 - 0.05)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_smooth_l1_weight_and_avg_factor_divide_the_weighted_sum():
    pred = torch.tensor([[1.0, 3.0], [0.5, 0.0]])
    weight = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    loss = smooth_l1_loss(pred, torch.zeros(2, 2), beta=1.0, weight=weight, avg_factor=4.0)
    expected = (1 * 0.5 + 0 * 2.5 + 2 * 0.125 + 0.0) / (4.0 + EPS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_smooth_l1_all_zero_weight_gives_connected_zero():
    pred = torch.randn(3, 4, requires_grad=True)
    loss = smooth_l1_loss(pred, torch.randn(3, 4), weight=torch.zeros(3, 4), avg_factor=0.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(3, 4))


def test_smooth_l1_empty_target_is_zero():
    pred = torch.zeros(0, 4, requires_grad=True)
    assert smooth_l1_loss(pred, torch.zeros(0, 4)).item() == 0.0


def _mmdet_smooth_l1(pred, target, beta):
    diff = torch.abs(pred - target)  # mmdet/models/losses/smooth_l1_loss.py, by hand
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [1.0, 1 / 9, 0.11, 3.0, 1e-6, 1e3])
def test_smooth_l1_and_l1_are_bit_equal_to_mmdets_formula(dtype, beta):
    g = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(2, 5000, 4, generator=g, dtype=dtype) * 2).unbind()
    b = torch.tensor(beta, dtype=dtype).item()
    pred[:5, 0], target[:5, 0] = torch.tensor([b, -b, 0.0, 1e-30, 1e30], dtype=dtype), 0  # |d| = beta, 0, tiny, huge
    weight = (torch.rand(5000, 4, generator=g) > 0.3).to(dtype)
    assert torch.equal(F.smooth_l1_loss(pred, target, reduction="none", beta=beta),
                       _mmdet_smooth_l1(pred, target, beta))
    expected = (_mmdet_smooth_l1(pred, target, beta) * weight).sum() / (7.0 + EPS)
    assert torch.equal(smooth_l1_loss(pred, target, beta, weight, avg_factor=7.0), expected)
    assert torch.equal(smooth_l1_loss(pred, target, beta), _mmdet_smooth_l1(pred, target, beta).mean())
    assert torch.equal(l1_loss(pred, target, weight, avg_factor=7.0),
                       ((pred - target).abs() * weight).sum() / (7.0 + EPS))


@pytest.mark.parametrize("loss_fn", [smooth_l1_loss, l1_loss])
def test_box_loss_without_targets_is_a_zero_connected_to_the_predictions(loss_fn):
    pred = torch.ones(2, 4, requires_grad=True)  # predictions for boxes whose targets were all filtered out
    loss = loss_fn(pred, torch.zeros(0, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros(2, 4))


@pytest.mark.parametrize("loss_fn", [smooth_l1_loss, l1_loss])
def test_box_loss_shape_mismatch_names_the_loss_and_both_shapes(loss_fn):
    with pytest.raises(ValueError, match=rf"^{loss_fn.__name__}: pred \(3, 4\) and target \(2, 4\) differ"):
        loss_fn(torch.zeros(3, 4), torch.zeros(2, 4))


def test_avg_factor_zero_is_guarded_by_eps():
    loss = l1_loss(torch.zeros(2), torch.zeros(2), weight=torch.ones(2), avg_factor=0.0)
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_l1_with_weight_and_avg_factor():
    loss = l1_loss(torch.tensor([1.0, -2.0, 3.0]), torch.zeros(3), weight=torch.tensor([1.0, 1.0, 0.0]),
                   avg_factor=2.0)
    assert loss.item() == pytest.approx(3.0 / (2.0 + EPS), rel=1e-6)


def test_cross_entropy_plain_mean():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    loss = cross_entropy(logits, torch.tensor([0, 1]))
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_default_mean_counts_ignored_elements():
    # mmdet's avg_non_ignore=False: the semantic loss divides by every pixel, ignored ones included
    logits = torch.zeros(4, 3)
    labels = torch.tensor([0, 1, 255, 255])
    loss = cross_entropy(logits, labels, ignore_index=255)
    assert loss.item() == pytest.approx(2 * math.log(3) / 4, rel=1e-6)


def test_cross_entropy_avg_non_ignore_matches_pytorch_mean():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 3, 255, 1, 255, 2])
    loss = cross_entropy(logits, labels, ignore_index=255, avg_non_ignore=True)
    expected = F.cross_entropy(logits, labels, ignore_index=255)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cross_entropy_weight_and_avg_factor():
    logits = torch.zeros(3, 2)
    loss = cross_entropy(logits, torch.tensor([0, 1, 1]), weight=torch.tensor([1.0, 0.5, 0.0]), avg_factor=3.0)
    assert loss.item() == pytest.approx(1.5 * math.log(2) / (3.0 + EPS), rel=1e-6)


def test_binary_cross_entropy_hand_computation():
    loss = binary_cross_entropy(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_binary_cross_entropy_negative_labels_get_no_weight():
    loss = binary_cross_entropy(torch.tensor([0.0, 5.0]), torch.tensor([1.0, -1.0]), avg_factor=1.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_mask_cross_entropy_uses_the_gt_class_channel():
    logits = torch.full((2, 3, 2, 2), 50.0)
    logits[0, 1] = 0.0
    logits[1, 2] = 0.0
    targets = torch.ones(2, 2, 2)
    loss = mask_cross_entropy(logits, targets, torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_mask_cross_entropy_without_positives_is_connected_zero():
    logits = torch.zeros(0, 3, 28, 28, requires_grad=True)
    loss = mask_cross_entropy(logits, torch.zeros(0, 28, 28), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad


def test_focal_loss_hand_computation():
    # p = 0.5: positive term alpha * (1 - p)^gamma * log 2, negative term (1 - alpha) * p^gamma * log 2
    logits = torch.zeros(1, 2)
    loss = focal_loss(logits, torch.tensor([[1.0, 0.0]]), alpha=0.25, gamma=2.0, avg_factor=1.0)
    expected = (0.25 * 0.25 + 0.75 * 0.25) * math.log(2)
    assert loss.item() == pytest.approx(expected / (1.0 + EPS), rel=1e-6)


def test_focal_loss_per_prior_weight_broadcasts_over_classes():
    logits = torch.randn(4, 3)
    targets = (torch.rand(4, 3) > 0.5).float()
    weight = torch.tensor([1.0, 0.0, 0.5, 2.0])
    loss = focal_loss(logits, targets, weight=weight, avg_factor=3.0)
    expected = focal_loss(logits, targets, weight=weight[:, None].expand(4, 3).contiguous(), avg_factor=3.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_loss_integer_labels_one_hot_with_last_label_as_background():
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 2, 3, 1, 3])  # 3 = background
    onehot = torch.zeros(5, 3)
    onehot[[0, 1, 3], [0, 2, 1]] = 1.0
    assert focal_loss(logits, labels).item() == pytest.approx(focal_loss(logits, onehot).item(), rel=1e-6)


def test_bounded_iou_loss_is_zero_for_equal_boxes_up_to_eps():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    assert bounded_iou_loss(boxes, boxes).item() < 1e-6


def test_bounded_iou_loss_hand_computation():
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    pred = torch.tensor([[1.0, 0.0, 11.0, 10.0]])  # shifted by one pixel in x
    eps, beta = 1e-3, 0.2
    terms = [1 - 8 / (12 + eps), 1 - 10 / (10 + eps), 1 - 10 / (10 + eps), 1 - 10 / (10 + eps)]
    expected = sum(t - beta / 2 if t >= beta else 0.5 * t * t / beta for t in terms) / 4
    assert bounded_iou_loss(pred, target, beta=beta, eps=eps).item() == pytest.approx(expected, rel=1e-5)


def test_bounded_iou_loss_has_no_gradient_through_target():
    pred = torch.tensor([[1.0, 2.0, 11.0, 14.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    bounded_iou_loss(pred, target).backward()
    assert pred.grad.abs().sum() > 0 and target.grad is None


@pytest.mark.parametrize("name, call", [
    ("smooth_l1", lambda f: smooth_l1_loss(f["pred"], f["target"], 1 / 9, f["weight"], 7.0)),
    ("smooth_l1_mean", lambda f: smooth_l1_loss(f["pred"], f["target"])),
    ("l1", lambda f: l1_loss(f["pred"], f["target"], f["weight"], 5.0)),
    ("ce", lambda f: cross_entropy(f["cls_logits"], f["cls_labels"], f["cls_weight"], 6.0)),
    ("ce_mean", lambda f: cross_entropy(f["cls_logits"], f["cls_labels"])),
    ("ce_ignore", lambda f: cross_entropy(f["seg_logits"], f["seg_labels"], ignore_index=255)),
    ("ce_ignore_non_ignore",
     lambda f: cross_entropy(f["seg_logits"], f["seg_labels"], ignore_index=255, avg_non_ignore=True)),
    ("bce", lambda f: binary_cross_entropy(f["bce_logits"], f["bce_labels"], f["bce_weight"], 11.0)),
    ("mask_ce", lambda f: mask_cross_entropy(f["mask_logits"], f["mask_targets"], f["mask_labels"])),
    ("focal", lambda f: focal_loss(f["focal_logits"], f["focal_targets"], f["focal_weight"], avg_factor=4.0)),
    ("focal_int_labels", lambda f: focal_loss(f["loc_logits"], f["loc_labels"], f["loc_weight"], avg_factor=6.0)),
    ("bounded_iou",
     lambda f: bounded_iou_loss(f["biou_pred"], f["biou_target"], weight=f["biou_weight"], avg_factor=9.0)),
])
@pytest.mark.reference
def test_loss_matches_mmdet(mmdet_losses, name, call):
    ours = call(mmdet_losses)
    assert ours.item() == pytest.approx(mmdet_losses[name].item(), rel=1e-6, abs=1e-7)
