"""Plain RPN: parity with mmdetection 3.3.0 (oracle dumps) and behaviour on tiny hand-made inputs."""
from pathlib import Path

import pytest
import torch
from _proposal_helpers import (
    assert_losses_match_oracle,
    assert_matches_oracle_inference,
    assert_same_proposal_set,
    keep_all,
    load_oracle,
    tiny_targets,
    total_losses_over_steps,
)

from htc_lightning.models.interfaces import FeatureSpec
from htc_lightning.models.proposals import RPN

FIXTURES = Path(__file__).parent / "fixtures" / "rpn"
RPN_DUMPS = ["tiny_cascade_s0", "tiny_cascade_s1", "tiny_htc_s0", "tiny_htc_s3", "tiny_htc_nosem_s0"]


@pytest.mark.reference
@pytest.mark.parametrize("name", RPN_DUMPS)
def test_raw_outputs_and_proposals_match_mmdet(name, device):
    d = load_oracle(name)
    head = RPN(FeatureSpec.pyramid(32), 32, test_nms_pre=1000, test_max_per_img=1000).eval()
    assert_matches_oracle_inference(head, d, device=device)


@pytest.mark.reference
def test_training_losses_match_mmdet_with_all_samples_kept():
    d = torch.load(FIXTURES / "rpn_loss_htc_s1.pt", weights_only=True)
    assert_losses_match_oracle(RPN(FeatureSpec.pyramid(32), 32, **keep_all()), d, {"loss_rpn_cls", "loss_rpn_bbox"})


@pytest.mark.reference
def test_training_proposals_use_train_settings_and_match_mmdet():
    d = torch.load(FIXTURES / "rpn_loss_htc_s1.pt", weights_only=True)
    cfg = d["rpn_proposal_cfg"]
    head = RPN(FeatureSpec.pyramid(32), 32, train_nms_pre=cfg["nms_pre"], train_max_per_img=cfg["max_per_img"],
               nms_iou=cfg["nms_iou"], test_nms_pre=10, test_max_per_img=10).train()
    props = head.proposals(tuple(d["raw"]), [d["img_size"]], head.train_settings)[0]
    assert_same_proposal_set(head, props, d["train_proposals"])


def test_state_dict_keys_are_mmdets():
    assert set(RPN(FeatureSpec.pyramid(32), 32).state_dict()) == {
        "rpn_conv.weight", "rpn_conv.bias", "rpn_cls.weight", "rpn_cls.bias", "rpn_reg.weight", "rpn_reg.bias"}


def test_proposals_are_detached_and_capped_by_max_per_img():
    torch.manual_seed(0)
    head = RPN(FeatureSpec.pyramid(8), 8, test_nms_pre=50, test_max_per_img=7).eval()
    feats = [torch.randn(1, 8, 64 // s, 64 // s, requires_grad=True) for s in (4, 8, 16, 32, 64)]
    props = head.proposals(head(feats), [(64, 64)], head.test_settings)[0]
    assert props.shape == (7, 5)
    assert not props.requires_grad
    assert torch.all(props[:-1, 4] >= props[1:, 4])


def test_batch_gives_each_image_its_own_proposals():
    torch.manual_seed(1)
    head = RPN(FeatureSpec.pyramid(8), 8, test_nms_pre=100, test_max_per_img=50).eval()
    feats = [torch.randn(3, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    sizes = [(64, 64), (48, 64), (64, 40)]
    batched = head.proposals(head(feats), sizes, head.test_settings)
    for i, size in enumerate(sizes):
        alone = head.proposals(head([f[i:i + 1] for f in feats]), [size], head.test_settings)[0]
        torch.testing.assert_close(batched[i], alone)


def test_a_sampler_keeping_every_anchor_makes_the_loss_deterministic():
    torch.manual_seed(2)
    head = RPN(FeatureSpec.pyramid(8), 8, **keep_all()).train()
    feats = [torch.randn(1, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    raw = head(feats)
    targets = [tiny_targets([[8.0, 8.0, 40.0, 36.0], [30.0, 20.0, 60.0, 60.0]], (64, 64))]
    first = head.loss(raw, targets, [(64, 64)])
    second = head.loss(raw, targets, [(64, 64)])
    for key in first:
        assert first[key].item() == second[key].item()


def test_loss_decreases_over_a_few_steps():
    torch.manual_seed(3)
    head = RPN(FeatureSpec.pyramid(8), 8, **keep_all())
    feats = [torch.randn(1, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    totals = total_losses_over_steps(head, feats, lr=0.5)
    assert totals[-1] < 0.5 * totals[0]


def test_image_without_boxes_gives_finite_losses():
    torch.manual_seed(4)
    head = RPN(FeatureSpec.pyramid(8), 8).train()
    feats = [torch.randn(1, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    losses = head.loss(head(feats), [tiny_targets([], (64, 64))], [(64, 64)])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_bbox"].item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loss_and_proposals_run_on_cuda():
    torch.manual_seed(5)
    head = RPN(FeatureSpec.pyramid(8), 8).cuda().train()
    feats = [torch.randn(2, 8, 64 // s, 64 // s, device="cuda") for s in (4, 8, 16, 32, 64)]
    targets = [tiny_targets([[8.0, 8.0, 40.0, 36.0]], (64, 64)), tiny_targets([[30.0, 20.0, 60.0, 60.0]], (64, 64))]
    targets = [{**t, "boxes": t["boxes"].cuda()} for t in targets]
    raw = head(feats)
    sum(head.loss(raw, targets, [(64, 64)] * 2).values()).backward()
    assert all(p.device.type == "cuda" for p in head.proposals(raw, [(64, 64)] * 2, head.train_settings))
