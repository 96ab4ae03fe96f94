"""How results are compared with a reference computed elsewhere: float differences at the tensor's scale, and
threshold / top-k / NMS decisions that may flip only where the reference lies at the boundary."""
import math

import pytest
import torch

from htc_lightning.models.interfaces import FeatureSpec
from htc_lightning.models.proposals import GARPN
from htc_lightning.tools.compare import (
    Tolerance,
    assert_close_to_reference,
    compare_kept_sets,
    diff,
    match_boxes,
    threshold_flips,
)
from htc_lightning.tools.mmdet_parity import Report, compare_raw


def test_difference_is_judged_against_the_scale_of_the_reference():
    ref = torch.tensor([1.45e6, 3.0, -2.0], dtype=torch.float64)
    ours = ref + torch.tensor([0.84, 0.0, 0.0], dtype=torch.float64)  # 6e-7 of the tensor's scale: rounding
    d = diff(ours, ref)
    assert d.ok and d.normalised == pytest.approx(0.84 / 1.45e6)
    assert "of scale" in str(d)


def test_a_difference_of_a_thousandth_of_the_scale_fails():
    ref = torch.linspace(-1, 1, 11)
    assert not diff(ref + 1e-3, ref).ok


def test_small_elements_of_a_large_tensor_take_the_tensors_scale():
    # per-element rtol would fail here; the error of a sum of large terms lands on small outputs too
    ref = torch.tensor([1.0e4, 1e-3])
    ours = torch.tensor([1.0e4, 1e-3 + 0.05])
    assert diff(ours, ref).ok
    with pytest.raises(AssertionError, match="allowed"):
        assert_close_to_reference(ours, ref, Tolerance(rtol=1e-6, atol=0.0), msg="t")


def test_shapes_must_agree():
    assert not diff(torch.zeros(3), torch.zeros(4)).ok
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(torch.zeros(3), torch.zeros(4), msg="t")


def test_difference_can_be_restricted_to_positions():
    ref = torch.tensor([1.0, 2.0, 3.0])
    ours = torch.tensor([1.0, 9.0, 3.0])
    assert diff(ours, ref, where=torch.tensor([True, False, True])).ok
    assert not diff(ours, ref).ok


def test_a_flip_where_the_reference_sits_on_the_threshold_is_a_near_tie():
    ref = torch.tensor([0.3, 0.5 + 1e-7, 0.9])
    ours = torch.tensor([0.3, 0.5 - 1e-7, 0.9])
    agree, flips = threshold_flips(ours, ref, 0.5)
    assert flips.count == 1 and flips.near_ties == 1 and flips.ok
    assert agree.tolist() == [True, False, True]


def test_a_flip_far_from_the_threshold_is_not_a_near_tie():
    ref = torch.tensor([0.3, 0.6, 0.9])
    _, flips = threshold_flips(ref, ref, 0.5, ref_threshold=0.7)  # ours decided with another threshold
    assert flips.count == 1 and flips.near_ties == 0 and not flips.ok


def box(x, y, w, h):
    return [x, y, x + w, y + h]


def test_identical_sets_match_whatever_their_order():
    boxes = torch.tensor([box(0, 0, 10, 10), box(20, 0, 10, 10)])
    scores = torch.tensor([0.9, 0.8])
    cmp = compare_kept_sets(boxes, scores, boxes.flip(0), scores.flip(0), nms_iou=0.5)
    assert cmp.ok and cmp.matched == 2 and cmp.near_ties == 0


def test_a_box_kept_on_one_side_only_at_the_nms_boundary_is_a_near_tie():
    a, b = box(0, 0, 10, 10), box(0, 0, 10, 10 / 0.7)  # IoU exactly 0.7 with a
    ref_boxes, ref_scores = torch.tensor([a, b]), torch.tensor([0.9, 0.8])
    cmp = compare_kept_sets(ref_boxes, ref_scores, ref_boxes[:1], ref_scores[:1], nms_iou=0.7)
    assert cmp.ok and cmp.near_ties == 1 and cmp.matched == 1


def test_a_box_dropped_far_from_any_boundary_is_unexplained():
    ref_boxes = torch.tensor([box(0, 0, 10, 10), box(50, 50, 10, 10)])
    ref_scores = torch.tensor([0.9, 0.8])
    cmp = compare_kept_sets(ref_boxes, ref_scores, ref_boxes[:1], ref_scores[:1], nms_iou=0.7, score_thr=0.05)
    assert not cmp.ok and cmp.unexplained == 1


def test_a_box_spared_because_its_suppressor_flipped_is_explained_by_the_cascade():
    # ref keeps b (IoU with a at the threshold), and b suppresses c; ours drops b, so c survives
    a, b, c = box(0, 0, 10, 10), box(0, 0, 10, 10 / 0.7), box(0, 1, 10, 10 / 0.7)  # IoU(b, c) 0.87, (a, c) 0.59
    ref = torch.tensor([a, b]), torch.tensor([0.9, 0.8])
    ours = torch.tensor([a, c]), torch.tensor([0.9, 0.7])
    cmp = compare_kept_sets(*ref, *ours, nms_iou=0.7)
    assert cmp.ok and cmp.near_ties == 2


def test_which_of_two_equally_scored_overlapping_boxes_nms_keeps_is_a_near_tie():
    # identical anchors on a flat background score exactly alike; NMS keeps whichever ranks first, and another
    # machine's rounding ranks them the other way (issue 24: an RPN proposal 8 px off)
    a, b = box(0, 0, 32, 32), box(0, 4, 32, 32)  # IoU 0.78, above the threshold: one suppresses the other
    cmp = compare_kept_sets(torch.tensor([a]), torch.tensor([0.4959]), torch.tensor([b]), torch.tensor([0.4959]),
                            nms_iou=0.7)
    assert cmp.ok and cmp.near_ties == 2 and cmp.matched == 0


def test_an_overlapping_box_kept_instead_of_a_clearly_higher_one_is_unexplained():
    a, b = box(0, 0, 32, 32), box(0, 4, 32, 32)
    cmp = compare_kept_sets(torch.tensor([a]), torch.tensor([0.9]), torch.tensor([b]), torch.tensor([0.5]),
                            nms_iou=0.7)
    assert not cmp.ok and cmp.unexplained == 2


def test_equal_scores_do_not_explain_a_box_that_overlaps_below_the_threshold():
    a, c = box(0, 0, 32, 32), box(0, 12, 32, 32)  # IoU 0.45: both survive NMS whatever their order
    cmp = compare_kept_sets(torch.tensor([a, c]), torch.tensor([0.5, 0.5]), torch.tensor([a]), torch.tensor([0.5]),
                            nms_iou=0.7)
    assert not cmp.ok and cmp.unexplained == 1


def test_a_box_at_the_top_k_cut_is_a_near_tie_and_one_above_it_is_not():
    boxes = torch.tensor([box(0, 0, 10, 10), box(20, 0, 10, 10), box(40, 0, 10, 10)])
    ref_scores = torch.tensor([0.9, 0.5, 0.5])  # two tied for the second place; the cut keeps 2
    ours_idx = [0, 2]
    cmp = compare_kept_sets(boxes[:2], ref_scores[:2], boxes[ours_idx], ref_scores[ours_idx], top_k=2)
    assert cmp.ok and cmp.near_ties == 2
    cmp = compare_kept_sets(boxes[:2], torch.tensor([0.9, 0.8]), boxes[ours_idx], ref_scores[ours_idx], top_k=2)
    assert not cmp.ok


def test_one_of_our_boxes_matches_at_most_one_reference_box_the_higher_scoring_first():
    twin = torch.tensor([box(0, 0, 10, 10), box(0, 0, 10, 10)])  # a duplicate the reference kept, ours did not
    assert match_boxes(twin, torch.tensor([0.8, 0.9]), twin[:1], torch.tensor([0.85]), score_tol=0.1) == [(1, 0)]


def test_labels_must_agree_for_a_match():
    boxes = torch.tensor([box(0, 0, 10, 10)])
    scores = torch.tensor([0.9])
    cmp = compare_kept_sets(boxes, scores, boxes, scores, torch.tensor([1]), torch.tensor([2]))
    assert cmp.matched == 0 and not cmp.ok


def _ga_raw(loc: torch.Tensor, cls: torch.Tensor):
    h, w = loc.shape
    return ([cls.view(1, 1, h, w)], [cls.view(1, 1, h, w).expand(1, 4, h, w)], [torch.zeros(1, 2, h, w)],
            [loc.view(1, 1, h, w)])


def test_ga_location_filter_flip_at_the_threshold_is_accepted_and_counted():
    head = GARPN(FeatureSpec.pyramid(8), 8).eval()
    thr = math.log(head.loc_filter_thr / (1 - head.loc_filter_thr))
    ref_loc = torch.tensor([[thr + 1e-5, 2.0], [-8.0, 1.0]])
    ours_loc = ref_loc.clone()
    ours_loc[0, 0] = thr - 1e-5  # ours filters the location, the reference keeps it
    ref_cls = torch.tensor([[0.3, 0.2], [0.0, 0.1]])
    ours_cls = ref_cls * (ours_loc.sigmoid() >= head.loc_filter_thr)
    rep = Report()
    compare_raw(rep, head, _ga_raw(ours_loc, ours_cls), _ga_raw(ref_loc, ref_cls), "loc_filter_thr=0.01")
    assert not rep.failed and rep.near_ties == 1, rep.lines


def test_ga_location_filter_flip_away_from_the_threshold_fails():
    head = GARPN(FeatureSpec.pyramid(8), 8).eval()
    # sigmoid(-3) = 0.047: the reference (threshold 0.05) filtered it, ours (0.01) keeps it
    ref_loc = torch.tensor([[-3.0, 2.0], [-8.0, 1.0]])
    ours_cls = torch.tensor([[0.3, 0.2], [0.0, 0.1]])
    ref_cls = ours_cls * (ref_loc.sigmoid() >= 0.05)
    rep = Report()
    compare_raw(rep, head, _ga_raw(ref_loc, ours_cls), _ga_raw(ref_loc, ref_cls), "loc_filter_thr=0.05")
    assert rep.near_ties == 0
    assert rep.failed and any(line.startswith("FAIL loc filter level 0") for line in rep.lines)

