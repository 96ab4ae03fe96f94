"""Guided Anchoring RPN: parity with mmdetection 3.3.0 and the GA-specific targets on hand-made boxes."""
import math
from pathlib import Path

import pytest
import torch
from _proposal_helpers import (
    assert_losses_match_oracle,
    assert_matches_oracle_inference,
    assert_same_proposal_set,
    keep_all_ga,
    load_oracle,
    tiny_targets,
    total_losses_over_steps,
)

from htc_lightning.models.interfaces import FeatureSpec
from htc_lightning.models.layers.assigners import MaxIoUAssigner, pairwise_iou
from htc_lightning.models.layers.losses import bounded_iou_loss
from htc_lightning.models.layers.samplers import RandomSampler
from htc_lightning.models.proposals import GARPN
from htc_lightning.models.proposals.ga_targets import location_targets, shape_targets

FIXTURES = Path(__file__).parent / "fixtures" / "rpn"
STRIDES = (4, 8, 16, 32, 64)


def tiny_feats(batch: int = 1, channels: int = 8, size: int = 64) -> list[torch.Tensor]:
    return [torch.randn(batch, channels, size // s, size // s) for s in STRIDES]


@pytest.mark.reference
@pytest.mark.parametrize("name,prefix,nms_pre,nms_post,max_per_img", [
    ("tiny_ga_rpn_s0", "bbox_head.", 2000, 1000, 1000),  # the RPN-only detector calls its head bbox_head
    ("tiny_htc_ga_s0", "rpn_head.", 1000, 1000, 300),
])
def test_raw_outputs_and_proposals_match_mmdet(name, prefix, nms_pre, nms_post, max_per_img, device):
    d = load_oracle(name)
    head = GARPN(FeatureSpec.pyramid(32), 32, test_nms_pre=nms_pre, test_nms_post=nms_post,
                 test_max_per_img=max_per_img).eval()
    assert_matches_oracle_inference(head, d, prefix, device)


@pytest.mark.reference
def test_training_losses_match_mmdet_with_all_samples_kept():
    d = torch.load(FIXTURES / "ga_rpn_loss_htc_ga_s2.pt", weights_only=True)
    assert_losses_match_oracle(GARPN(FeatureSpec.pyramid(32), 32, invert_loc_targets=True, **keep_all_ga()), d,
                               {"loss_rpn_cls", "loss_rpn_bbox", "loss_anchor_shape", "loss_anchor_loc"})


@pytest.mark.reference
def test_training_proposals_skip_the_location_filter_and_match_mmdet():
    d = torch.load(FIXTURES / "ga_rpn_loss_htc_ga_s2.pt", weights_only=True)
    cfg = d["rpn_proposal_cfg"]
    head = GARPN(FeatureSpec.pyramid(32), 32, train_nms_pre=cfg["nms_pre"], train_nms_post=cfg["nms_post"],
                 train_max_per_img=cfg["max_per_img"], nms_iou=cfg["nms_iou"]).train()
    assert_same_proposal_set(head, head.proposals(tuple(d["raw"]), [d["img_size"]], head.train_settings)[0],
                             d["train_proposals"], head.train_settings)


@pytest.mark.reference
def test_location_targets_match_mmdet():
    d = torch.load(FIXTURES / "ga_rpn_loss_htc_ga_s2.pt", weights_only=True)
    sizes = [tuple(t.shape[-2:]) for t in d["loc_targets"]]
    targets, weights, avg = location_targets([d["boxes"]], sizes, STRIDES, 8)
    for ours, ref in zip(targets + weights, d["loc_targets"] + d["loc_weights"], strict=True):
        torch.testing.assert_close(ours, ref)
    assert avg == pytest.approx(d["loc_avg_factor"])


def test_location_targets_on_a_hand_made_box():
    # a 64 x 64 box: level floor(log2(64 / 32) + 0.5) = 1 (stride 8), i.e. cells 0..8 of that level
    sizes = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    targets, weights, avg = location_targets([torch.tensor([[0.0, 0.0, 64.0, 64.0]])], sizes, STRIDES, 8)
    # centre 20 %: round(0.4 * 8) = 3 .. round(0.6 * 8) = 5; ignore 50 %: 2 .. 6
    expected_t = torch.zeros(16, 16)
    expected_t[3:6, 3:6] = 1
    expected_w = torch.full((16, 16), 0.1)
    expected_w[2:7, 2:7] = 0
    expected_w[3:6, 3:6] = 1
    torch.testing.assert_close(targets[1][0, 0], expected_t)
    torch.testing.assert_close(weights[1][0, 0], expected_w)
    # adjacent levels: the ignore region only (stride 4: cells 4..12; stride 16: cells 1..3)
    below = torch.full((32, 32), 0.1)
    below[4:13, 4:13] = 0
    above = torch.full((8, 8), 0.1)
    above[1:4, 1:4] = 0
    torch.testing.assert_close(weights[0][0, 0], below)
    torch.testing.assert_close(weights[2][0, 0], above)
    assert targets[0].sum() == 0 and targets[2].sum() == 0
    assert torch.all(weights[3] == 0.1) and torch.all(weights[4] == 0.1)
    assert avg == pytest.approx((32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2) / 200)


@pytest.mark.parametrize("side,level", [(20.0, 0), (50.0, 1), (100.0, 2), (400.0, 4)])
def test_location_targets_pick_the_level_by_box_scale(side, level):
    sizes = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    targets, _, _ = location_targets([torch.tensor([[0.0, 0.0, side, side]])], sizes, STRIDES, 8)
    assert [int(t.sum() > 0) for t in targets] == [int(i == level) for i in range(5)]


def test_approx_anchors_decide_the_shape_assignment():
    head = GARPN(FeatureSpec.pyramid(8), 8)
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    approxs = torch.cat(head.approx_generator.grid_anchors(sizes))
    squares = torch.cat(head.square_generator.grid_anchors(sizes))
    # the gt is exactly the ratio-0.5, smallest-scale approx anchor at (32, 32) on level 0 (stride 4)
    w, h = 4 * 8 * math.sqrt(2.0), 4 * 8 / math.sqrt(2.0)
    gt = torch.tensor([[32 - w / 2, 32 - h / 2, 32 + w / 2, 32 + h / 2]])
    loc = 8 * 16 + 8
    assert pairwise_iou(squares[loc:loc + 1], gt).item() < 0.7  # the square alone would not be positive
    inside = torch.ones(squares.shape[0], dtype=torch.bool)
    result = shape_targets(approxs, squares, inside, {"boxes": gt}, head.ga_assigner, RandomSampler(None, 0.5, -1,
                           add_gt_as_proposals=False), head.approxs_per_octave)
    assert result.weights[loc] == 1
    torch.testing.assert_close(result.gt_boxes[loc], gt[0])
    torch.testing.assert_close(result.squares[loc], squares[loc])
    square_only = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=False).assign(squares, gt)
    assert square_only.gt_inds[loc] <= 0


def test_shape_loss_is_the_bounded_iou_of_guided_anchors_and_their_gts():
    torch.manual_seed(0)
    head = GARPN(FeatureSpec.pyramid(8), 8, **keep_all_ga()).train()
    raw = head(tiny_feats())
    targets = [tiny_targets([[10.0, 12.0, 50.0, 30.0]], (64, 64))]
    loss = head.loss(raw, targets, [(64, 64)])["loss_anchor_shape"]

    sizes = [tuple(s.shape[-2:]) for s in raw[0]]
    approxs = torch.cat(head.approx_generator.grid_anchors(sizes))
    squares = torch.cat(head.square_generator.grid_anchors(sizes))
    st = shape_targets(approxs, squares, torch.ones(squares.shape[0], dtype=torch.bool), targets[0],
                       head.ga_assigner, head.ga_sampler, head.approxs_per_octave)
    pos = st.weights > 0
    shape = torch.cat([s.permute(0, 2, 3, 1).reshape(-1, 2) for s in raw[2]])[pos]
    guided = head.guided_anchors(st.squares[pos], shape)
    expected = bounded_iou_loss(guided, st.gt_boxes[pos], beta=0.2, weight=torch.ones_like(guided),
                                avg_factor=st.avg_factor)
    assert pos.any()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loc_targets_inversion_flag():
    # mmdet 3.3.0 trains the centre region towards 0 (see GARPN.loss); the default is the paper's reading
    torch.manual_seed(1)
    boxes = [[10.0, 12.0, 50.0, 30.0]]
    mmdet_like = GARPN(FeatureSpec.pyramid(8), 8, invert_loc_targets=True).train()
    paper = GARPN(FeatureSpec.pyramid(8), 8).train()
    paper.load_state_dict(mmdet_like.state_dict())
    raw = mmdet_like(tiny_feats())
    sizes = [tuple(s.shape[-2:]) for s in raw[3]]
    loc_t, _, _ = location_targets([torch.tensor(boxes)], sizes, STRIDES, 8)
    confident = [20 * (2 * t - 1) for t in loc_t]  # logits +20 at the centres, -20 elsewhere
    raw = (raw[0], raw[1], raw[2], confident)
    targets = [tiny_targets(boxes, (64, 64))]
    assert paper.loss(raw, targets, [(64, 64)])["loss_anchor_loc"].item() < 1e-3
    assert mmdet_like.loss(raw, targets, [(64, 64)])["loss_anchor_loc"].item() > 1.0


def test_state_dict_keys_are_mmdets():
    assert set(GARPN(FeatureSpec.pyramid(8), 8).state_dict()) == {
        "rpn_conv.weight", "rpn_conv.bias", "conv_loc.weight", "conv_loc.bias", "conv_shape.weight",
        "conv_shape.bias", "feature_adaption.conv_offset.weight", "feature_adaption.conv_adaption.weight",
        "conv_cls.weight", "conv_cls.bias", "conv_reg.weight", "conv_reg.bias"}


def test_batch_of_four_gives_each_image_the_proposals_it_gets_alone():
    torch.manual_seed(2)
    head = GARPN(FeatureSpec.pyramid(8), 8, test_nms_pre=200, test_nms_post=100, test_max_per_img=80).eval()
    with torch.no_grad():  # large weights and a low location bias: the 0.01 filter keeps some cells, drops others
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.5)
        head.conv_loc.bias.fill_(-4.0)
    feats = tiny_feats(batch=4)
    sizes = [(64, 64), (64, 48), (40, 64), (64, 64)]
    raw = head(feats)
    kept = (raw[3][0].sigmoid() >= 0.01).float().mean()
    assert 0.05 < kept < 0.95
    assert raw[0][0].shape[0] == 4
    batched = head.proposals(raw, sizes, head.test_settings)
    for i, size in enumerate(sizes):
        alone = head.proposals(head([f[i:i + 1] for f in feats]), [size], head.test_settings)[0]
        assert len(alone) > 0
        # batched convolutions may sum in another order: same boxes up to float rounding
        torch.testing.assert_close(batched[i], alone, rtol=1e-3, atol=1e-3)


def test_proposals_follow_the_settings_given_not_the_module_mode():
    torch.manual_seed(3)
    head = GARPN(FeatureSpec.pyramid(8), 8, train_nms_pre=50, train_nms_post=40, train_max_per_img=30,
                 test_nms_pre=20, test_nms_post=10, test_max_per_img=10)
    with torch.no_grad():
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.5)
        head.conv_loc.bias.fill_(-4.0)
        feats = tiny_feats()
        raw = head(feats)
        for settings in (head.train_settings, head.test_settings):
            in_train = head.train().proposals(raw, [(64, 64)], settings)[0]
            in_eval = head.eval().proposals(raw, [(64, 64)], settings)[0]
            assert torch.equal(in_train, in_eval)
        kept_train = len(head.proposals(raw, [(64, 64)], head.train_settings)[0])
        assert 10 < kept_train <= 30 and len(head.proposals(raw, [(64, 64)], head.test_settings)[0]) == 10
        # the raw outputs do not depend on the mode either (the location filter is a proposal setting)
        assert all(torch.equal(a, b) for a, b in zip(head.train()(feats)[0], head.eval()(feats)[0]))


def test_location_filter_keeps_locations_reaching_the_threshold_with_the_test_settings_and_all_in_training():
    head = GARPN(FeatureSpec.pyramid(8), 8, loc_filter_thr=0.5)
    logits = torch.tensor([[-3.0, 0.0, 2.0]])  # sigmoid 0.047, 0.5, 0.88
    assert head.location_mask(logits, head.test_settings.location_filter).tolist() == [[False, True, True]]
    assert head.location_mask(logits, head.train_settings.location_filter).tolist() == [[True, True, True]]


def test_test_time_proposals_come_only_from_the_locations_the_filter_keeps():
    torch.manual_seed(3)
    head = GARPN(FeatureSpec.pyramid(8), 8, test_nms_pre=-1, test_nms_post=10_000, test_max_per_img=10_000,
                 min_bbox_size=-1.0, nms_iou=1.0).eval()
    with torch.no_grad():
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.5)
        head.conv_loc.bias.fill_(-4.0)
    raw = head(tiny_feats())
    kept = sum(int(head.location_mask(loc[0], location_filter=True).sum()) for loc in raw[3])
    assert 0 < kept < sum(loc[0].numel() for loc in raw[3])
    # nothing is suppressed or cut here: one proposal per kept location
    assert len(head.proposals(raw, [(64, 64)], head.test_settings)[0]) == kept


@pytest.mark.parametrize("invert", [False, True])
def test_location_bias_starts_at_the_001_prior_in_both_target_modes(invert):
    head = GARPN(FeatureSpec.pyramid(8), 8, invert_loc_targets=invert)
    assert torch.sigmoid(head.conv_loc.bias).item() == pytest.approx(0.01)


def test_loss_decreases_over_a_few_steps():
    torch.manual_seed(4)
    head = GARPN(FeatureSpec.pyramid(8), 8, **keep_all_ga())
    totals = total_losses_over_steps(head, tiny_feats(), lr=0.05)
    assert totals[-1] < 0.7 * totals[0]


def test_image_without_boxes_gives_finite_losses():
    torch.manual_seed(5)
    head = GARPN(FeatureSpec.pyramid(8), 8).train()
    targets = [tiny_targets([], (64, 64))]
    losses = head.loss(head(tiny_feats()), targets, [(64, 64)])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_anchor_shape"].item() == 0.0 and losses["loss_rpn_bbox"].item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loss_and_proposals_run_on_cuda():
    torch.manual_seed(6)
    head = GARPN(FeatureSpec.pyramid(8), 8).cuda().train()
    feats = [f.cuda() for f in tiny_feats(batch=2)]
    targets = [tiny_targets([[8.0, 8.0, 40.0, 36.0]], (64, 64)), tiny_targets([[30.0, 20.0, 60.0, 60.0]], (64, 64))]
    targets = [{**t, "boxes": t["boxes"].cuda()} for t in targets]
    raw = head(feats)
    sum(head.loss(raw, targets, [(64, 64)] * 2).values()).backward()
    assert all(p.device.type == "cuda" for p in head.proposals(raw, [(64, 64)] * 2, head.train_settings))
