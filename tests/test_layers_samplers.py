"""RandomSampler: budgets, positive fraction, gt boxes as proposals, keep-all mode, mmdet's picks per seed."""
from pathlib import Path

import pytest
import torch

from htc_lightning.models.layers.assigners import AssignResult
from htc_lightning.models.layers.samplers import RandomSampler

FIXTURE = Path(__file__).parent / "fixtures" / "layers" / "mmdet_anchor_assign.pt"


def make_assign(gt_inds: list[int], num_gts: int = 2, labels: tuple[int, ...] = (3, 7)) -> AssignResult:
    inds = torch.tensor(gt_inds, dtype=torch.long)
    lab = torch.tensor(labels)
    return AssignResult(num_gts, inds, torch.rand(len(gt_inds)),
                        torch.where(inds > 0, lab[(inds - 1).clamp(min=0)], -1))


def boxes_for(n: int) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float32)
    return torch.stack([x, x, x + 10, x + 10], dim=1)


GTS = torch.tensor([[100.0, 100.0, 120.0, 120.0], [200.0, 200.0, 230.0, 220.0]])
GT_LABELS = torch.tensor([3, 7])


def test_budget_and_positive_fraction_are_respected():
    torch.manual_seed(0)
    gt_inds = [1] * 30 + [0] * 60 + [-1] * 10
    res = RandomSampler(num=16, pos_fraction=0.25, add_gt_as_proposals=False).sample(
        make_assign(gt_inds), boxes_for(100), GTS, GT_LABELS)
    assert res.pos_inds.numel() == 4 and res.neg_inds.numel() == 12
    assert bool((res.pos_inds < 30).all()) and bool(((res.neg_inds >= 30) & (res.neg_inds < 90)).all())


def test_negatives_fill_the_budget_left_by_few_positives():
    res = RandomSampler(num=8, pos_fraction=0.5, add_gt_as_proposals=False).sample(
        make_assign([2] + [0] * 20), boxes_for(21), GTS, GT_LABELS)
    assert res.pos_inds.numel() == 1 and res.neg_inds.numel() == 7


def test_neg_pos_ub_caps_negatives_relative_to_positives():
    res = RandomSampler(num=32, pos_fraction=0.5, neg_pos_ub=3, add_gt_as_proposals=False).sample(
        make_assign([1, 1] + [0] * 40), boxes_for(42), GTS, GT_LABELS)
    assert res.pos_inds.numel() == 2 and res.neg_inds.numel() == 6
    none_pos = RandomSampler(num=32, pos_fraction=0.5, neg_pos_ub=3, add_gt_as_proposals=False).sample(
        make_assign([0] * 40), boxes_for(40), GTS, GT_LABELS)
    assert none_pos.neg_inds.numel() == 3  # mmdet counts at least one positive for the cap


def test_sampled_indices_are_sorted_and_ignored_boxes_never_sampled():
    torch.manual_seed(1)
    gt_inds = [-1, 1, 0, -1, 2, 0, 0, 1, -1, 0, 2, 0]
    res = RandomSampler(num=6, pos_fraction=0.5, add_gt_as_proposals=False).sample(
        make_assign(gt_inds), boxes_for(12), GTS, GT_LABELS)
    assert torch.equal(res.pos_inds, res.pos_inds.sort().values)
    assert torch.equal(res.neg_inds, res.neg_inds.sort().values)
    assert not set(res.pos_inds.tolist() + res.neg_inds.tolist()) & {0, 3, 8}


def test_add_gt_prepends_gt_boxes_as_positives_flagged_is_gt():
    assign = make_assign([0, 1, 0, 2])
    res = RandomSampler(num=None, pos_fraction=0.25).sample(assign, boxes_for(4), GTS, GT_LABELS)
    assert res.pos_inds.tolist() == [0, 1, 3, 5]
    assert res.neg_inds.tolist() == [2, 4]
    assert res.pos_is_gt.tolist() == [1, 1, 0, 0]
    assert torch.equal(res.pos_boxes[:2], GTS)
    assert res.pos_assigned_gt_inds.tolist() == [0, 1, 0, 1]
    assert res.pos_gt_labels.tolist() == [3, 7, 3, 7]
    assert torch.equal(res.pos_gt_boxes, GTS[[0, 1, 0, 1]])
    assert res.num_gts == 2
    assert assign.gt_inds.shape == (6,)  # the assignment grew in place, as mmdet's add_gt_


def test_add_gt_without_labels_uses_label_zero():
    res = RandomSampler(num=None, pos_fraction=0.5).sample(make_assign([0, 0]), boxes_for(2), GTS)
    assert res.pos_gt_labels.tolist() == [0, 0]


def test_boxes_property_is_positives_then_negatives_and_score_column_dropped():
    proposals = torch.cat([boxes_for(3), torch.rand(3, 1)], dim=1)
    res = RandomSampler(num=None, pos_fraction=0.25, add_gt_as_proposals=False).sample(
        make_assign([0, 1, 0]), proposals, GTS, GT_LABELS)
    assert torch.equal(res.boxes, boxes_for(3)[[1, 0, 2]])


def test_keep_all_returns_every_positive_and_negative_in_order():
    gt_inds = [0, 1, -1, 2, 0, 0, 1, -1, 0]
    res = RandomSampler(num=None, pos_fraction=0.25, add_gt_as_proposals=False).sample(
        make_assign(gt_inds), boxes_for(9), GTS, GT_LABELS)
    assert res.pos_inds.tolist() == [1, 3, 6]
    assert res.neg_inds.tolist() == [0, 4, 5, 8]


def test_avg_factor_floors_each_count_at_one_like_mmdet():
    res = RandomSampler(num=4, pos_fraction=0.25, add_gt_as_proposals=False).sample(
        make_assign([0, 0, 0]), boxes_for(3), GTS, GT_LABELS)
    assert res.pos_inds.numel() == 0 and res.avg_factor == 1 + 3


def test_no_gts_gives_only_negatives():
    res = RandomSampler(num=4, pos_fraction=0.25).sample(
        AssignResult(0, torch.zeros(6, dtype=torch.long), torch.zeros(6), torch.full((6,), -1)),
        boxes_for(6), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert res.pos_inds.numel() == 0 and res.neg_inds.numel() == 4
    assert res.pos_gt_boxes.shape == (0, 4) and res.pos_is_gt.shape == (0,)


def test_same_seed_gives_same_sample():
    def draw():
        torch.manual_seed(123)
        return RandomSampler(num=10, pos_fraction=0.3, add_gt_as_proposals=False).sample(
            make_assign([1] * 20 + [0] * 40), boxes_for(60), GTS, GT_LABELS)
    a, b = draw(), draw()
    assert torch.equal(a.pos_inds, b.pos_inds) and torch.equal(a.neg_inds, b.neg_inds)


def test_box_count_must_match_the_assignment():
    with pytest.raises(ValueError, match="3 boxes but the assignment covers 4"):
        RandomSampler(num=4, pos_fraction=0.25).sample(make_assign([0, 0, 1, 0]), boxes_for(3), GTS, GT_LABELS)


@pytest.mark.reference
def test_sampler_picks_equal_mmdet_with_the_same_seed():
    # mmdet draws torch.randperm on CPU for positives then negatives; our draws follow the same sequence.
    for case in torch.load(FIXTURE, weights_only=False)["sampler"]:
        kwargs = dict(case["kwargs"])
        if kwargs["num"] == 10**7:
            kwargs["num"] = None  # our keep-all mode
        assign = AssignResult(len(case["gts"]), case["gt_inds"].clone(), case["max_overlaps"].clone(),
                              case["assigned_labels"].clone())
        torch.manual_seed(case["seed"])
        res = RandomSampler(**kwargs).sample(assign, case["boxes"], case["gts"], case["labels"])
        for ours, theirs in [("pos_inds", "pos_inds"), ("neg_inds", "neg_inds"), ("pos_boxes", "pos_priors"),
                             ("neg_boxes", "neg_priors"), ("pos_gt_boxes", "pos_gt_bboxes"),
                             ("pos_gt_labels", "pos_gt_labels"), ("pos_assigned_gt_inds", "pos_assigned_gt_inds"),
                             ("pos_is_gt", "pos_is_gt")]:
            assert torch.equal(getattr(res, ours), case[theirs]), f"{ours} with {case['kwargs']}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_assign_and_sample_stay_on_cuda():
    from htc_lightning.models.layers.assigners import MaxIoUAssigner

    boxes = boxes_for(50).cuda()
    assign = MaxIoUAssigner(0.5, 0.3).assign(boxes, boxes[[3, 20]], GT_LABELS.cuda())
    res = RandomSampler(num=8, pos_fraction=0.25).sample(assign, boxes, boxes[[3, 20]], GT_LABELS.cuda())
    assert res.pos_inds.is_cuda and res.neg_inds.is_cuda and res.boxes.is_cuda
    assert res.pos_inds.numel() == 2 and res.neg_inds.numel() == 6
