import math
from pathlib import Path

import pytest
import torch
import torchvision

from htc_lightning.models.layers.nms import batched_soft_nms, mmcv_batched_nms, multiclass_nms, soft_nms
from htc_lightning.tools.compare import assert_close_to_reference

FIXTURE = Path(__file__).parent / "fixtures" / "layers" / "mmdet_layers.pt"


def _random_boxes(n: int, seed: int, size: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # integer corners keep IoUs away from float ties with the threshold
    xy = torch.randint(0, int(size), (n, 2), generator=gen).float()
    wh = torch.randint(5, 40, (n, 2), generator=gen).float()
    scores = torch.randperm(n, generator=gen).float() / n + 0.01  # distinct scores
    return torch.cat([xy, xy + wh], 1), scores


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _soft_nms_reference(boxes, scores, iou_threshold, sigma, min_score, method):
    """Bodla et al.'s algorithm 1 as written, on Python floats."""
    boxes, scores = boxes.tolist(), scores.tolist()
    remaining = list(range(len(boxes)))
    kept = []
    while remaining:
        best = max(remaining, key=lambda i: (scores[i], -i))
        remaining.remove(best)
        kept.append((best, scores[best]))
        for i in list(remaining):
            iou = _iou(boxes[best], boxes[i])
            if method == "linear":
                scores[i] *= (1 - iou) if iou > iou_threshold else 1.0
            elif method == "gaussian":
                scores[i] *= math.exp(-iou * iou / sigma)
            else:
                scores[i] *= 0.0 if iou > iou_threshold else 1.0
            if scores[i] < min_score:
                remaining.remove(i)
    return kept


def test_mmcv_batched_nms_matches_torchvision():
    boxes, scores = _random_boxes(300, seed=0)
    idxs = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(1))
    ours = mmcv_batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(ours, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


def test_mmcv_batched_nms_split_path_matches_offset_path():
    boxes, scores = _random_boxes(300, seed=2)
    idxs = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(mmcv_batched_nms(boxes, scores, idxs, 0.6, split_thr=10),
                       mmcv_batched_nms(boxes, scores, idxs, 0.6))


def test_mmcv_batched_nms_class_agnostic_is_plain_nms():
    boxes, scores = _random_boxes(200, seed=4)
    idxs = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(mmcv_batched_nms(boxes, scores, idxs, 0.5, class_agnostic=True),
                       torchvision.ops.nms(boxes, scores, 0.5))


def test_mmcv_batched_nms_empty():
    keep = mmcv_batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.long


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
def test_soft_nms_matches_bruteforce_reference(method):
    boxes, scores = _random_boxes(80, seed=6, size=60.0)
    inds, decayed = soft_nms(boxes, scores, iou_threshold=0.3, sigma=0.5, min_score=0.05, method=method)
    expected = _soft_nms_reference(boxes, scores, 0.3, 0.5, 0.05, method)
    assert inds.tolist() == [i for i, _ in expected]
    assert torch.allclose(decayed, torch.tensor([s for _, s in expected]), atol=1e-6)


def test_soft_nms_scores_are_decreasing():
    boxes, scores = _random_boxes(60, seed=7, size=40.0)
    _, decayed = soft_nms(boxes, scores, method="gaussian", min_score=0.0)
    assert bool((decayed[:-1] >= decayed[1:]).all())


def test_soft_nms_linear_decays_only_above_threshold():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 2.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    inds, decayed = soft_nms(boxes, scores, iou_threshold=0.3, method="linear")
    # box 1 has IoU 0.8 with box 0 -> 0.8 * 0.2; box 2 has IoU 0.2 -> untouched
    assert inds.tolist() == [0, 2, 1]
    assert torch.allclose(decayed, torch.tensor([0.9, 0.7, 0.16]), atol=1e-6)


def test_soft_nms_drops_boxes_decayed_under_min_score():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.5]])
    inds, _ = soft_nms(boxes, torch.tensor([0.9, 0.5]), iou_threshold=0.3, min_score=0.1, method="linear")
    assert inds.tolist() == [0]  # 0.5 * (1 - 0.95) = 0.025 < 0.1


def test_soft_nms_rejects_unknown_method():
    with pytest.raises(ValueError, match="cubic"):
        soft_nms(torch.zeros(1, 4), torch.ones(1), method="cubic")


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_batched_soft_nms_is_per_class_soft_nms(method):
    boxes, scores = _random_boxes(120, seed=8, size=50.0)
    idxs = torch.randint(0, 4, (120,), generator=torch.Generator().manual_seed(9))
    inds, decayed = batched_soft_nms(boxes, scores, idxs, 0.3, 0.5, 1e-3, method)
    expected = {}
    for cls in range(4):
        members = (idxs == cls).nonzero().squeeze(1)
        for i, s in _soft_nms_reference(boxes[members], scores[members], 0.3, 0.5, 1e-3, method):
            expected[int(members[i])] = s
    assert sorted(inds.tolist()) == sorted(expected)
    assert torch.allclose(decayed, torch.tensor([expected[i] for i in inds.tolist()]), atol=1e-6)
    assert bool((decayed[:-1] >= decayed[1:]).all())


def test_multiclass_nms_score_threshold_is_strict():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([[0.5, 0.05], [0.05, 0.06]])
    _, kept_scores, labels, rows = multiclass_nms(boxes, scores, score_thr=0.05, iou_threshold=0.5)
    assert kept_scores.tolist() == pytest.approx([0.5, 0.06])
    assert labels.tolist() == [0, 1] and rows.tolist() == [0, 1]


def test_multiclass_nms_suppresses_within_a_class_only():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0]])
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.7]])
    _, kept_scores, labels, rows = multiclass_nms(boxes, scores, score_thr=0.05, iou_threshold=0.5)
    # each class keeps its own best of the overlapping pair
    assert list(zip(labels.tolist(), rows.tolist())) == [(0, 0), (1, 1)]
    assert kept_scores.tolist() == pytest.approx([0.9, 0.7])


def test_multiclass_nms_max_num_keeps_the_best():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [100.0, 0.0, 110.0, 10.0]])
    scores = torch.tensor([[0.3], [0.9], [0.6]])
    _, kept_scores, _, rows = multiclass_nms(boxes, scores, 0.0, 0.5, max_num=2)
    assert rows.tolist() == [1, 2] and kept_scores.tolist() == pytest.approx([0.9, 0.6])


def test_multiclass_nms_per_class_boxes():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]]])  # (N=1, C=2, 4)
    scores = torch.tensor([[0.2, 0.8]])
    out_boxes, _, labels, rows = multiclass_nms(boxes, scores, 0.1, 0.5)
    assert labels.tolist() == [1, 0] and rows.tolist() == [0, 0]
    assert torch.equal(out_boxes, torch.tensor([[40.0, 40.0, 50.0, 50.0], [0.0, 0.0, 10.0, 10.0]]))
    flat = multiclass_nms(boxes.reshape(1, 8), scores, 0.1, 0.5)[0]
    assert torch.equal(flat, out_boxes)


def test_multiclass_nms_nothing_above_threshold():
    out_boxes, kept_scores, labels, rows = multiclass_nms(torch.rand(3, 4), torch.full((3, 2), 0.01), 0.05, 0.5)
    assert out_boxes.shape == (0, 4) and kept_scores.shape == labels.shape == rows.shape == (0,)


def test_multiclass_nms_soft_keeps_overlaps_with_decayed_scores():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0]])
    scores = torch.tensor([[0.9], [0.8]])
    _, kept_scores, _, rows = multiclass_nms(boxes, scores, 0.05, 0.3, nms_type="soft_nms_linear")
    assert rows.tolist() == [0, 1] and kept_scores.tolist() == pytest.approx([0.9, 0.16], abs=1e-6)


@pytest.mark.reference
@pytest.mark.parametrize("case", ["nms", "nms_shared", "soft_linear", "soft_gaussian"])
def test_multiclass_nms_matches_mmdet(case):
    fixture = torch.load(FIXTURE, weights_only=False)["multiclass_nms"]
    ref = fixture["cases"][case]
    cfg = ref["cfg"]
    boxes = fixture["boxes"][:, 0] if case == "nms_shared" else fixture["boxes"]
    nms_type = "nms" if cfg["type"] == "nms" else f"soft_nms_{cfg['method']}"
    out_boxes, kept_scores, labels, rows = multiclass_nms(
        boxes, fixture["scores"][:, :-1], ref["score_thr"], cfg["iou_threshold"], ref["max_num"], nms_type,
        cfg.get("sigma", 0.5), cfg.get("min_score", 1e-3))
    num_classes = fixture["scores"].shape[1] - 1
    assert torch.equal(out_boxes, ref["dets"][:, :4])
    assert_close_to_reference(kept_scores, ref["dets"][:, 4], msg="kept scores")
    assert torch.equal(labels, ref["labels"])
    assert torch.equal(rows, ref["inds"] // num_classes)


def test_batched_soft_nms_equals_one_pass_over_class_offset_boxes():
    # mmcv runs Soft-NMS once over boxes shifted apart per class: after its first pick every other box,
    # in any class, is checked against min_score, so a class whose best box starts below it loses that box
    boxes, scores = _random_boxes(40, seed=10, size=50.0)
    scores[:5] = 0.02
    idxs = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(11))
    shifted = boxes + (idxs.float() * (boxes.max() + 1))[:, None]
    expected = _soft_nms_reference(shifted, scores, 0.3, 0.5, 0.05, "linear")
    inds, decayed = batched_soft_nms(boxes, scores, idxs, 0.3, 0.5, 0.05, "linear")
    assert inds.tolist() == [i for i, _ in expected]
    assert torch.allclose(decayed, torch.tensor([s for _, s in expected]), atol=1e-6)


def test_batched_soft_nms_split_path_runs_classes_independently():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.02])
    idxs = torch.tensor([0, 1])
    assert batched_soft_nms(boxes, scores, idxs, min_score=0.05)[0].tolist() == [0]
    assert batched_soft_nms(boxes, scores, idxs, min_score=0.05, split_thr=1)[0].tolist() == [0, 1]
