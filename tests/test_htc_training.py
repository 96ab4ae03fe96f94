"""Training-side behaviour of the HTC RoI head that the inference dumps cannot show: interleaving, the mask
information flow's gradients, loss names and weights, samplers, degenerate images."""
from functools import partial

import pytest
import torch

from htc_lightning.models.interfaces import FeatureSpec
from htc_lightning.models.layers.assigners import MaxIoUAssigner
from htc_lightning.models.layers.samplers import RandomSampler
from htc_lightning.models.roi_heads import CascadeRoIHead, FCNMaskHead, FusedSemanticHead, Shared2FCBBoxHead

NUM_CLASSES = 3
GT = torch.tensor([[10.0, 10.0, 40.0, 40.0]])


def keep_all() -> RandomSampler:
    """Every candidate sampled (mmdet with a 10**7 budget): losses independent of the random draw."""
    return RandomSampler(None, 0.25)


def make_head(**kw) -> CascadeRoIHead:
    torch.manual_seed(0)
    kw.setdefault("semantic_head", partial(FusedSemanticHead, conv_out_channels=8, num_classes=5))
    kw.setdefault("mask_head", partial(FCNMaskHead, conv_channels=8, num_convs=2))
    kw.setdefault("interleaved", True)
    kw.setdefault("mask_info_flow", True)
    return CascadeRoIHead(FeatureSpec.pyramid(8, NUM_CLASSES),
                          bbox_head=partial(Shared2FCBBoxHead, fc_out_channels=16), score_thr=0.0, **kw)


def make_feats(size: int = 64, batch: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(batch, 8, size // s, size // s) for s in (4, 8, 16, 32, 64)]


def make_target(boxes: torch.Tensor = GT, size: int = 64) -> dict:
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for m, b in zip(masks, boxes.long()):
        m[b[1]:b[3], b[0]:b[2]] = 1
    semantic = torch.full((size, size), 255, dtype=torch.long)
    semantic[size // 2:] = 4
    return {"boxes": boxes, "labels": torch.arange(len(boxes)) % NUM_CLASSES, "masks": masks, "semantic": semantic,
            "crowd_boxes": torch.zeros(0, 4),
            "meta": {"orig_size": (size, size), "img_size": (size, size), "pad_size": (size, size),
                     "scale_factor": (1.0, 1.0)}}


def make_proposals() -> torch.Tensor:
    # two boxes on the gt (IoU 0.8 and 0.9 before refinement), two on the background
    boxes = torch.tensor([[12.0, 10.0, 42.0, 40.0], [10.0, 12.0, 40.0, 40.0], [44.0, 44.0, 60.0, 60.0],
                          [0.0, 40.0, 20.0, 62.0]])
    return torch.cat([boxes, torch.linspace(0.9, 0.6, 4)[:, None]], 1)


def shift_regression(head: CascadeRoIHead, stage: int, delta_x: float) -> None:
    """Make box head ``stage`` move every box right by ``delta_x`` (in units of the coder's std)."""
    with torch.no_grad():
        head.bbox_head[stage].fc_reg.weight.zero_()
        head.bbox_head[stage].fc_reg.bias.copy_(torch.tensor([delta_x, 0.0, 0.0, 0.0]))


def record_rois(head: CascadeRoIHead, method: str) -> list[tuple[int, torch.Tensor]]:
    calls = []
    original = getattr(head, method)

    def spy(stage, feats, rois, semantic_feat=None):
        calls.append((stage, rois.detach().clone()))
        return original(stage, feats, rois, semantic_feat)

    setattr(head, method, spy)
    return calls


def as_set(boxes: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(round(v, 3) for v in b.tolist()) for b in boxes}


def test_loss_dict_holds_mmdets_loss_names_only_and_accuracies_go_to_metrics():
    head = make_head()
    metrics: dict = {}
    losses = head.loss(make_feats(), [make_proposals()], [make_target()], metrics=metrics)
    assert set(losses) == {"loss_semantic_seg"} | {f"s{t}.{n}" for t in range(3)
                                                   for n in ("loss_cls", "loss_bbox", "loss_mask")}
    assert all(v.requires_grad for v in losses.values())
    assert set(metrics) == {"s0.acc", "s1.acc", "s2.acc"}
    assert not any(v.requires_grad for v in metrics.values())
    assert all(0 <= float(v) <= 100 for v in metrics.values())


def test_loss_without_a_metrics_dict_gives_the_same_losses():
    feats, props, target = make_feats(), [make_proposals()], [make_target()]
    head = make_head(sampler=keep_all())
    a, b = head.loss(feats, props, target), head.loss(feats, props, target, metrics={})
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_loss_weights_scale_box_and_mask_losses():
    feats, props, target = make_feats(), [make_proposals()], [make_target()]
    plain = make_head(stage_loss_weights=(1, 1, 1), sampler=keep_all())
    weighted = make_head(stage_loss_weights=(1, 0.5, 0.25), sampler=keep_all())
    ma, mb = {}, {}
    a, b = plain.loss(feats, props, target, metrics=ma), weighted.loss(feats, props, target, metrics=mb)
    for t, w in enumerate((1, 0.5, 0.25)):
        for name in ("loss_cls", "loss_bbox", "loss_mask"):
            torch.testing.assert_close(b[f"s{t}.{name}"], a[f"s{t}.{name}"] * w)
        torch.testing.assert_close(mb[f"s{t}.acc"], ma[f"s{t}.acc"])  # accuracies are not weighted


def test_interleaved_mask_head_trains_on_regressed_and_resampled_boxes():
    head = make_head(interleaved=True)
    shift_regression(head, 0, 1.0)  # dx = 0.1 box widths
    mask_calls = record_rois(head, "mask_stage")
    head.loss(make_feats(), [make_proposals()], [make_target()])
    stage0 = next(r for t, r in mask_calls if t == 0)
    # the gt (re-added by the second sampling) and the two proposals on it, shifted right by 3 px; the second
    # one keeps IoU >= 0.5 after the shift, the first (already 2 px right) too
    expected = GT.tolist() + [[15.0, 10.0, 45.0, 40.0], [13.0, 12.0, 43.0, 40.0]]
    assert as_set(stage0[:, 1:]) == as_set(torch.tensor(expected))


def test_cascade_mask_head_trains_on_the_box_sample_positives():
    head = make_head(interleaved=False, mask_info_flow=False, semantic_head=None)
    shift_regression(head, 0, 1.0)
    mask_calls = record_rois(head, "mask_stage")
    head.loss(make_feats(), [make_proposals()], [make_target()])
    stage0 = next(r for t, r in mask_calls if t == 0)
    assert as_set(stage0[:, 1:]) == as_set(torch.cat([GT, make_proposals()[:2, :4]]))


def test_refined_boxes_without_the_added_gts_are_the_next_stage_proposals():
    head = make_head(sampler=keep_all())
    shift_regression(head, 0, 1.0)
    box_calls = record_rois(head, "box_stage")
    head.loss(make_feats(), [make_proposals()], [make_target()])
    stage1 = next(r for t, r in box_calls if t == 1)
    shifted = make_proposals()[:, :4].clone()
    widths = shifted[:, 2] - shifted[:, 0]
    shifted[:, [0, 2]] = (shifted[:, [0, 2]] + 0.1 * widths[:, None]).clamp(max=64)
    # stage 1 sees its own gt copy plus the four regressed proposals; the regressed gt of stage 0 is dropped
    assert as_set(stage1[:, 1:]) == as_set(torch.cat([GT, shifted]))


def test_mask_information_flow_trains_earlier_mask_heads_through_later_losses():
    head = make_head(mask_info_flow=True)
    losses = head.loss(make_feats(), [make_proposals()], [make_target()])
    losses["s2.loss_mask"].backward()
    assert head.mask_head[0].convs[0].weight.grad.abs().sum() > 0
    assert head.mask_head[1].conv_res.weight.grad.abs().sum() > 0
    assert head.mask_head[2].conv_res.weight.grad.abs().sum() > 0
    # head 0 only passes its conv feature along: its deconv/logits are not on the stage-2 path
    assert head.mask_head[0].conv_logits.weight.grad is None


def test_without_information_flow_mask_heads_are_independent():
    head = make_head(mask_info_flow=False)
    assert not hasattr(head.mask_head[1], "conv_res")
    losses = head.loss(make_feats(), [make_proposals()], [make_target()])
    losses["s2.loss_mask"].backward()
    assert head.mask_head[0].convs[0].weight.grad is None


def test_the_sampler_budget_limits_the_rois_and_num_none_lifts_it():
    head = make_head(sampler=RandomSampler(3, 0.34))
    box_calls = record_rois(head, "box_stage")
    head.loss(make_feats(), [make_proposals()], [make_target()])
    assert all(len(r) == 3 for _, r in box_calls)
    head = make_head(sampler=keep_all())
    box_calls = record_rois(head, "box_stage")
    head.loss(make_feats(), [make_proposals()], [make_target()])
    assert len(box_calls[0][1]) == 5  # 4 proposals + the gt


def test_a_sampler_keeping_every_candidate_makes_losses_independent_of_the_seed():
    head = make_head(sampler=keep_all())
    feats, props, target = make_feats(), [make_proposals()], [make_target()]
    torch.manual_seed(1)
    a = head.loss(feats, props, target)
    torch.manual_seed(2)
    b = head.loss(feats, props, target)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_two_images_are_assigned_to_their_own_targets():
    head = make_head(sampler=keep_all())
    feats = make_feats(batch=2)
    other = torch.tensor([[30.0, 5.0, 60.0, 30.0], [5.0, 35.0, 30.0, 60.0]])
    box_calls = record_rois(head, "box_stage")
    head.loss(feats, [make_proposals(), make_proposals()[2:]], [make_target(), make_target(other)])
    rois = box_calls[0][1]
    assert as_set(rois[rois[:, 0] == 1, 1:]) == as_set(torch.cat([other, make_proposals()[2:, :4]]))


def test_image_without_objects_gives_zero_box_and_mask_losses_with_gradients():
    head = make_head()
    target = make_target(torch.zeros(0, 4))
    losses = head.loss(make_feats(), [make_proposals()], [target])
    for t in range(3):
        assert float(losses[f"s{t}.loss_bbox"].detach()) == 0 and float(losses[f"s{t}.loss_mask"].detach()) == 0
        assert torch.isfinite(losses[f"s{t}.loss_cls"])
    sum(losses.values()).backward()


def test_single_stage_head_names_losses_like_mask_rcnn():
    head = make_head(num_stages=1, stage_loss_weights=(1,), iou_thresholds=(0.5,),
                     target_stds=((0.1, 0.1, 0.2, 0.2),), interleaved=False, mask_info_flow=False,
                     semantic_head=None)
    losses = head.loss(make_feats(), [make_proposals()], [make_target()])
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_mask"}


def test_semantic_head_needs_semantic_targets():
    target = make_target()
    del target["semantic"]
    with pytest.raises(ValueError, match="semantic"):
        make_head().loss(make_feats(), [make_proposals()], [target])


@pytest.mark.parametrize("bad", [{"stage_loss_weights": (1, 0.5)}, {"iou_thresholds": (0.5,)},
                                 {"mask_merge": "max"}, {"nms_type": "fast"}, {"semantic_fusion": ("box",)},
                                 {"mask_head": None, "mask_info_flow": True}])
def test_constructor_rejects_inconsistent_options(bad):
    with pytest.raises(ValueError):
        make_head(**bad)


@pytest.mark.parametrize("ignore_iof_thr, kept", [(-1.0, True), (0.5, False)])
def test_crowd_boxes_make_candidates_ignored_only_when_ignore_iof_thr_is_set(ignore_iof_thr, kept):
    head = make_head(assigner=partial(MaxIoUAssigner, ignore_iof_thr=ignore_iof_thr), sampler=keep_all())
    target = make_target()
    target["crowd_boxes"] = torch.tensor([[40.0, 40.0, 64.0, 64.0]])
    box_calls = record_rois(head, "box_stage")
    head.loss(make_feats(), [make_proposals()], [target])
    inside_crowd = (44.0, 44.0, 60.0, 60.0)
    assert (inside_crowd in as_set(box_calls[0][1][:, 1:])) == kept
