"""The proposal generators' shared last step (``models/proposals/postprocess.py``): the best scores of a level
under each mmdet head's tie rule, decode -> min-size filter -> NMS, and TTA's merge of views' proposals."""
import pytest
import torch

from htc_lightning.models.layers.box_coder import BoxCoder
from htc_lightning.models.proposals.postprocess import decode_and_suppress, merge_view_proposals, top_scores

CODER = BoxCoder()  # zero deltas decode to the anchors themselves


def suppress(boxes, scores, level_ids=None, min_bbox_size=0.0, max_num=10, img_size=(100, 100)):
    boxes, scores = torch.tensor(boxes), torch.tensor(scores)
    return decode_and_suppress(CODER, boxes, torch.zeros_like(boxes), scores, img_size, min_bbox_size, 0.7,
                               max_num, None if level_ids is None else torch.tensor(level_ids))


@pytest.mark.parametrize("ties", ["sort", "topk"])
def test_top_scores_keep_the_k_best_first_under_either_tie_rule(ties):
    scores = torch.tensor([[0.2, 0.9, 0.5, 0.7], [0.6, 0.1, 0.8, 0.3]])
    values, order = top_scores(scores, 2, ties)
    assert torch.equal(values, torch.tensor([[0.9, 0.7], [0.8, 0.6]]))
    assert order.tolist() == [[1, 3], [2, 0]]


@pytest.mark.parametrize("k", [0, -1, 4, 5])
def test_top_scores_keep_everything_in_place_without_a_cut(k):
    scores = torch.tensor([0.2, 0.9, 0.5, 0.7])
    values, order = top_scores(scores, k, "topk")
    assert order is None and values is scores


def test_an_unknown_tie_rule_is_an_error():
    with pytest.raises(ValueError, match="'stable'"):
        top_scores(torch.rand(5), 2, "stable")


def test_degenerate_boxes_are_dropped_with_min_bbox_size_zero():
    out = suppress([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 20.0], [30.0, 30.0, 40.0, 40.0]], [0.9, 0.8, 0.7])
    assert out[:, :4].tolist() == [[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0]]


def test_a_negative_min_bbox_size_keeps_degenerate_boxes():
    out = suppress([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 20.0]], [0.9, 0.8], min_bbox_size=-1.0)
    assert len(out) == 2


def test_boxes_not_larger_than_min_bbox_size_are_dropped():
    out = suppress([[0.0, 0.0, 4.0, 10.0], [20.0, 20.0, 25.0, 25.0]], [0.9, 0.8], min_bbox_size=4.0)
    assert out[:, :4].tolist() == [[20.0, 20.0, 25.0, 25.0]]


def test_decoded_boxes_are_clipped_to_the_image():
    out = suppress([[-5.0, 10.0, 30.0, 120.0]], [0.9], img_size=(100, 80))
    assert out[0].tolist() == pytest.approx([0.0, 10.0, 30.0, 100.0, 0.9])


def test_level_ids_make_the_nms_per_level_and_without_them_it_is_one_nms():
    same = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]
    assert len(suppress(same, [0.9, 0.8], level_ids=[0, 0])) == 1
    assert len(suppress(same, [0.9, 0.8], level_ids=[0, 1])) == 2
    assert len(suppress(same, [0.9, 0.8])) == 1


def test_proposals_come_by_decreasing_score_cut_to_max_num():
    boxes = [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]]
    out = suppress(boxes, [0.5, 0.9, 0.7], max_num=2)
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.7])


def test_nothing_left_after_the_size_filter_gives_an_empty_five_column_set():
    assert suppress([[5.0, 5.0, 5.0, 20.0]], [0.9]).shape == (0, 5)


def test_merging_no_views_is_an_error():
    with pytest.raises(ValueError, match="no views"):
        merge_view_proposals([], 0.7, 10)
