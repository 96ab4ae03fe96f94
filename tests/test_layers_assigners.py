"""MaxIoUAssigner / ApproxMaxIoUAssigner: each rule on hand-made boxes, then mmdet's numbers on random cases."""
from pathlib import Path

import pytest
import torch

from htc_lightning.models.layers.assigners import (
    ApproxMaxIoUAssigner,
    AssignResult,
    MaxIoUAssigner,
    pairwise_iof,
    pairwise_iou,
)
from htc_lightning.tools.compare import assert_close_to_reference

FIXTURE = Path(__file__).parent / "fixtures" / "layers" / "mmdet_anchor_assign.pt"

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


def box(x1, y1, x2, y2):
    return [float(x1), float(y1), float(x2), float(y2)]


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=False)


def test_positive_negative_and_in_between_by_iou():
    boxes = torch.tensor([box(0, 0, 10, 9),      # IoU 0.9 -> pos
                          box(0, 0, 10, 5),      # IoU 0.5 -> between thresholds -> ignore
                          box(0, 0, 10, 2),      # IoU 0.2 -> neg
                          box(20, 20, 30, 30)])  # IoU 0 -> neg
    res = MaxIoUAssigner(0.7, 0.3, match_low_quality=False).assign(boxes, GT, torch.tensor([4]))
    assert res.gt_inds.tolist() == [1, -1, 0, 0]
    assert res.labels.tolist() == [4, -1, -1, -1]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([0.9, 0.5, 0.2, 0.0]))
    assert res.num_gts == 1


def test_positive_threshold_is_inclusive_and_negative_exclusive():
    boxes = torch.tensor([box(0, 0, 10, 5), box(0, 0, 10, 3)])  # IoU 0.5, 0.3
    res = MaxIoUAssigner(0.5, 0.3, match_low_quality=False).assign(boxes, GT)
    assert res.gt_inds.tolist() == [1, -1]


def test_negative_range_tuple_keeps_only_ious_inside_the_range():
    boxes = torch.tensor([box(0, 0, 10, 0.5), box(0, 0, 10, 2), box(20, 20, 30, 30)])  # IoU 0.05, 0.2, 0
    res = MaxIoUAssigner(0.7, (0.1, 0.3), match_low_quality=False).assign(boxes, GT)
    assert res.gt_inds.tolist() == [-1, 0, -1]


def test_positive_goes_to_the_gt_of_highest_iou():
    gts = torch.tensor([box(0, 0, 10, 10), box(1, 0, 11, 10)])
    res = MaxIoUAssigner(0.5, 0.3, match_low_quality=False).assign(torch.tensor([box(1, 0, 11, 9)]), gts,
                                                                   torch.tensor([0, 1]))
    assert res.gt_inds.tolist() == [2] and res.labels.tolist() == [1]


def test_low_quality_match_gives_each_gt_its_best_box_above_min_pos_iou():
    boxes = torch.tensor([box(0, 0, 10, 4), box(0, 0, 10, 2), box(50, 50, 60, 60)])  # IoU 0.4, 0.2, 0
    gts = torch.tensor([box(0, 0, 10, 10), box(50, 50, 70, 70)])  # second gt: best IoU 0.25
    res = MaxIoUAssigner(0.7, 0.1, min_pos_iou=0.3).assign(boxes, gts)
    assert res.gt_inds.tolist() == [1, -1, -1]  # gt 2's best (0.25) is below min_pos_iou: stays in between
    res = MaxIoUAssigner(0.7, 0.1, min_pos_iou=0.2).assign(boxes, gts)
    assert res.gt_inds.tolist() == [1, -1, 2]
    res = MaxIoUAssigner(0.7, 0.1, min_pos_iou=0.2, match_low_quality=False).assign(boxes, gts)
    assert res.gt_inds.tolist() == [-1, -1, -1]


def test_ties_for_a_gts_best_box_all_match_with_gt_max_assign_all():
    boxes = torch.tensor([box(0, 0, 10, 4), box(0, 0, 10, 4), box(0, 6, 10, 10), box(0, 0, 10, 1)])
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign(boxes, GT)
    assert res.gt_inds.tolist() == [1, 1, 1, 0]
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, gt_max_assign_all=False).assign(boxes, GT)
    assert res.gt_inds.tolist() == [1, -1, -1, 0]  # only the first argmax; 0.4 lies between the thresholds


def test_low_quality_match_of_a_later_gt_overrides_an_earlier_one():
    gts = torch.tensor([box(0, 0, 10, 10), box(0, 0, 10, 10)])
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign(torch.tensor([box(0, 0, 10, 5)]), gts)
    assert res.gt_inds.tolist() == [2]


def test_boxes_inside_a_crowd_region_are_ignored_by_iof():
    boxes = torch.tensor([box(40, 40, 50, 50),   # inside the crowd box: IoF 1 -> ignore
                          box(55, 40, 65, 50),   # half inside: IoF 0.5, not > 0.5 -> neg
                          box(0, 0, 10, 9)])     # pos
    crowd = torch.tensor([box(30, 30, 60, 60)])
    res = MaxIoUAssigner(0.7, 0.3, ignore_iof_thr=0.5).assign(boxes, GT, gt_boxes_ignore=crowd)
    assert res.gt_inds.tolist() == [-1, 0, 1]
    assert res.max_overlaps[0].item() == -1.0
    res = MaxIoUAssigner(0.7, 0.3, ignore_iof_thr=-1).assign(boxes, GT, gt_boxes_ignore=crowd)
    assert res.gt_inds.tolist() == [0, 0, 1]


def test_ignore_wrt_gt_divides_by_the_crowd_box_area():
    boxes = torch.tensor([box(40, 40, 50, 50)])
    crowd = torch.tensor([box(30, 30, 60, 60)])  # overlap 100 / crowd area 900
    wrt_box = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, ignore_iof_thr=0.5).assign(boxes, GT, gt_boxes_ignore=crowd)
    wrt_gt = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, ignore_iof_thr=0.2, ignore_wrt_candidates=False).assign(
        boxes, GT, gt_boxes_ignore=crowd)
    assert wrt_box.gt_inds.tolist() == [-1] and wrt_gt.gt_inds.tolist() == [0]


def test_min_pos_iou_zero_lets_a_gt_without_overlap_take_every_zero_iou_box():
    # mmdet quirk kept for parity: the low-quality match compares with ``>= min_pos_iou`` even at IoU 0.
    boxes = torch.tensor([box(40, 40, 50, 50), box(60, 60, 70, 70)])
    assert MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.0).assign(boxes, GT).gt_inds.tolist() == [1, 1]
    assert MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.1).assign(boxes, GT).gt_inds.tolist() == [0, 0]


def test_no_gts_makes_every_box_negative_even_inside_crowd():
    boxes = torch.tensor([box(40, 40, 50, 50), box(0, 0, 10, 10)])
    crowd = torch.tensor([box(30, 30, 60, 60)])
    res = MaxIoUAssigner(0.7, 0.3, ignore_iof_thr=0.5).assign(boxes, torch.zeros(0, 4),
                                                              torch.zeros(0, dtype=torch.long), crowd)
    assert res.num_gts == 0
    assert res.gt_inds.tolist() == [0, 0] and res.labels.tolist() == [-1, -1]
    assert res.max_overlaps.tolist() == [0.0, 0.0]


def test_no_boxes_gives_empty_result():
    res = MaxIoUAssigner(0.7, 0.3).assign(torch.zeros(0, 4), GT, torch.tensor([1]))
    assert res.gt_inds.shape == (0,) and res.labels.shape == (0,) and res.max_overlaps.shape == (0,)


def test_without_labels_positives_get_label_zero():
    res = MaxIoUAssigner(0.7, 0.3).assign(torch.tensor([box(0, 0, 10, 9), box(30, 30, 40, 40)]), GT)
    assert res.labels.tolist() == [0, -1]


def test_add_gt_prepends_gts_as_positives_with_iou_one():
    res = AssignResult(2, torch.tensor([0, 1, -1]), torch.tensor([0.1, 0.8, 0.4]), torch.tensor([-1, 3, -1]))
    res.add_gt_(torch.tensor([3, 5]))
    assert res.gt_inds.tolist() == [1, 2, 0, 1, -1]
    assert res.labels.tolist() == [3, 5, -1, 3, -1]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([1.0, 1.0, 0.1, 0.8, 0.4]))


def test_iou_of_two_empty_boxes_is_zero_like_mmdet():
    empty = torch.tensor([box(3, 3, 3, 3)])
    assert pairwise_iou(empty, empty).item() == 0.0
    assert pairwise_iof(torch.tensor([box(0, 0, 10, 10)]), torch.tensor([box(5, 0, 20, 10)])).item() == 0.5


def test_score_column_of_proposals_is_ignored():
    boxes = torch.tensor([box(0, 0, 10, 9) + [0.3], box(0, 0, 10, 2) + [0.9]])
    res = MaxIoUAssigner(0.7, 0.3).assign(boxes, GT)
    assert res.gt_inds.tolist() == [1, 0]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([0.9, 0.2]))


def test_approx_iou_is_the_max_over_the_approxs_of_a_location():
    squares = torch.tensor([box(0, 0, 4, 4), box(20, 20, 24, 24)])
    # two approxs per location, location-major: rows 0-1 belong to square 0, rows 2-3 to square 1
    approxs = torch.tensor([box(0, 0, 2, 2), box(0, 0, 10, 9), box(20, 20, 22, 22), box(20, 20, 21, 21)])
    res = ApproxMaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign_approx(approxs, squares, 2, GT)
    assert res.gt_inds.tolist() == [1, 0]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([0.9, 0.0]))


def test_approx_assigner_rejects_wrong_approx_count():
    with pytest.raises(ValueError, match="3 approxs for 2 squares"):
        ApproxMaxIoUAssigner(0.7, 0.3).assign_approx(torch.zeros(3, 4), torch.zeros(2, 4), 2, GT)


@pytest.mark.reference
def test_max_iou_assigner_equals_mmdet_on_random_cases(fixture):
    for i, case in enumerate(fixture["assigner"]):
        res = MaxIoUAssigner(**case["kwargs"]).assign(case["boxes"], case["gts"], case["labels"], case["ignore"])
        msg = f"case {i} ({case['name']}, {len(case['gts'])} gts)"
        assert torch.equal(res.gt_inds, case["gt_inds"]), msg
        assert torch.equal(res.labels, case["assigned_labels"]), msg
        assert_close_to_reference(res.max_overlaps, case["max_overlaps"], msg=msg)


@pytest.mark.reference
def test_approx_max_iou_assigner_equals_mmdet_on_ga_anchors(fixture):
    for i, case in enumerate(fixture["approx"]):
        res = ApproxMaxIoUAssigner(**case["kwargs"]).assign_approx(case["approxs"], case["squares"], 9, case["gts"],
                                                                   case["labels"], case["ignore"])
        assert torch.equal(res.gt_inds, case["gt_inds"]), f"case {i}"
        assert torch.equal(res.labels, case["assigned_labels"]), f"case {i}"
        assert_close_to_reference(res.max_overlaps, case["max_overlaps"], msg=f"case {i}")


def random_boxes(n, gen, size=64.0):
    xy = torch.rand(n, 2, generator=gen) * size
    return torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=gen) * size / 2], 1)


def test_padded_batch_assignment_equals_each_image_assigned_alone():
    # images of different candidate and gt counts, some candidates flagged invalid: padding takes no part
    gen = torch.Generator().manual_seed(0)
    boxes = [random_boxes(n, gen) for n in (40, 25, 33)]
    gts = [random_boxes(g, gen) for g in (3, 5, 1)]
    gts[0] = torch.cat([gts[0], boxes[0][:2] + 0.5])  # near-duplicates: positives and low-quality ties
    labels = [torch.randint(0, 80, (len(g),), generator=gen) for g in gts]
    valid = [torch.rand(len(b), generator=gen) > 0.2 for b in boxes]
    assigner = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.3)
    batched = assigner.assign_batch(boxes, gts, labels, valid)
    for b, g, lab, v, res in zip(boxes, gts, labels, valid, batched, strict=True):
        alone = assigner.assign(b, g, lab, valid=v)
        assert res.num_gts == alone.num_gts
        assert torch.equal(res.gt_inds, alone.gt_inds) and torch.equal(res.labels, alone.labels)


def test_invalid_candidates_are_assigned_as_if_removed():
    gen = torch.Generator().manual_seed(1)
    boxes, gts = random_boxes(30, gen), random_boxes(4, gen)
    valid = torch.arange(30) % 3 != 0
    assigner = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.1)
    flagged = assigner.assign(boxes, gts, torch.arange(4), valid=valid)
    removed = assigner.assign(boxes[valid], gts, torch.arange(4))
    assert torch.equal(flagged.gt_inds[valid], removed.gt_inds)
    assert (flagged.gt_inds[~valid] == -1).all()
