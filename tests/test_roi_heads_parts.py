"""The RoI heads' parts on tiny hand-built inputs: box targets and loss normalisation, the mask head's
information-flow input, the semantic loss normalisation, and the test-time paths of the HTC head."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from htc_lightning.models.interfaces import FeatureSpec
from htc_lightning.models.layers.samplers import SamplingResult
from htc_lightning.models.roi_heads import CascadeRoIHead, FCNMaskHead, FusedSemanticHead, Shared2FCBBoxHead


def sampling(pos: list[list[float]], gts: list[list[float]], labels: list[int], neg: list[list[float]]):
    def boxes(b):
        return torch.tensor(b, dtype=torch.float).reshape(-1, 4)

    return SamplingResult(pos_inds=torch.arange(len(pos)), neg_inds=torch.arange(len(neg)) + len(pos),
                          pos_boxes=boxes(pos), neg_boxes=boxes(neg), pos_gt_boxes=boxes(gts),
                          pos_gt_labels=torch.tensor(labels, dtype=torch.long),
                          pos_assigned_gt_inds=torch.zeros(len(pos), dtype=torch.long),
                          pos_is_gt=torch.zeros(len(pos), dtype=torch.uint8), num_gts=1)


# ---- box head -----------------------------------------------------------------------------------------------
def test_box_targets_put_background_last_and_weight_only_positive_regression():
    head = Shared2FCBBoxHead(FeatureSpec.pyramid(2, 4), fc_out_channels=8)
    s = sampling([[0, 0, 10, 10]], [[1, 1, 11, 11]], [2], [[20, 20, 30, 30], [5, 20, 9, 30]])
    labels, label_w, box_t, box_w = head.targets([s])
    assert labels.tolist() == [2, 4, 4]
    assert label_w.tolist() == [1, 1, 1]
    torch.testing.assert_close(box_t[0], torch.tensor([0.1 / 0.1, 0.1 / 0.1, 0.0, 0.0]))
    assert box_w.tolist() == [[1] * 4, [0] * 4, [0] * 4]


def test_box_regression_loss_is_divided_by_all_sampled_rois():
    head = Shared2FCBBoxHead(FeatureSpec.pyramid(2, 4), fc_out_channels=8)
    s = sampling([[0, 0, 10, 10]], [[1, 1, 11, 11]], [2], [[20, 20, 30, 30], [5, 20, 9, 30], [1, 1, 3, 3]])
    targets = head.targets([s])
    cls_score = torch.randn(4, 5)
    bbox_pred = torch.zeros(4, 4)
    losses = head.loss(cls_score, bbox_pred, *targets)
    # one positive with |target| = 1, 1, 0, 0: smooth-L1(beta=1) gives 0.5 + 0.5, over 4 sampled RoIs
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(1.0 / 4))
    torch.testing.assert_close(losses["loss_cls"], F.cross_entropy(cls_score, targets[0]))
    assert set(losses) == {"loss_cls", "loss_bbox"}  # losses only: their sum is what is optimised
    expected_acc = (cls_score.argmax(1) == targets[0]).float().mean() * 100
    torch.testing.assert_close(head.accuracy(cls_score, targets[0]), expected_acc)


def test_box_head_without_positives_has_zero_regression_loss_with_a_graph():
    head = Shared2FCBBoxHead(FeatureSpec.pyramid(2, 4), fc_out_channels=8)
    s = sampling([], [], [], [[20, 20, 30, 30]])
    bbox_pred = torch.randn(1, 4, requires_grad=True)
    losses = head.loss(torch.randn(1, 5), bbox_pred, *head.targets([s]))
    assert float(losses["loss_bbox"].detach()) == 0 and losses["loss_bbox"].requires_grad


def test_regress_clips_each_roi_to_its_own_image():
    head = Shared2FCBBoxHead(FeatureSpec.pyramid(2, 1), fc_out_channels=8, target_stds=(1, 1, 1, 1))
    rois = torch.tensor([[0, 0, 0, 30, 30], [1, 0, 0, 30, 30]], dtype=torch.float)
    out = head.regress(rois, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]), [(100, 100), (40, 40)])
    torch.testing.assert_close(out, torch.tensor([[30.0, 0, 60, 30], [30.0, 0, 40, 30]]))


# ---- mask head ----------------------------------------------------------------------------------------------
def test_mask_head_adds_relu_of_conv_res_of_the_previous_feature():
    torch.manual_seed(0)
    head = FCNMaskHead(FeatureSpec.pyramid(4, 2), conv_channels=4, num_convs=1, with_conv_res=True)
    x, prev = torch.randn(3, 4, 14, 14), torch.randn(3, 4, 14, 14)
    logits, feat = head(x, prev)
    expected_feat = torch.relu(head.convs[0](x + torch.relu(head.conv_res(prev))))
    torch.testing.assert_close(feat, expected_feat)
    assert logits.shape == (3, 2, 28, 28)


def test_mask_head_without_conv_res_rejects_a_previous_feature():
    head = FCNMaskHead(FeatureSpec.pyramid(4, 2), conv_channels=4, num_convs=1)
    with pytest.raises(ValueError, match="with_conv_res"):
        head(torch.randn(1, 4, 14, 14), torch.randn(1, 4, 14, 14))


# ---- semantic head ------------------------------------------------------------------------------------------
def semantic_case():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 4, 4)
    small = torch.randint(0, 5, (1, 4, 4))
    small[0, :2] = 255  # half of the pixels unlabeled
    # full-resolution labels whose every 8x8 block carries its label at the top-left pixel only: nearest
    # downsampling by 1/8 must read exactly those pixels
    full = torch.randint(0, 5, (1, 32, 32))
    full[:, ::8, ::8] = small
    return logits, full, small


def test_semantic_loss_averages_over_all_pixels_including_ignored():
    logits, full, small = semantic_case()
    head = FusedSemanticHead(FeatureSpec.pyramid(4), conv_out_channels=4, num_classes=5)
    expected = 0.2 * F.cross_entropy(logits, small, ignore_index=255, reduction="sum") / small.numel()
    torch.testing.assert_close(head.loss(logits, full), expected)


def test_semantic_loss_avg_non_ignore_averages_over_labeled_pixels_only():
    logits, full, small = semantic_case()
    head = FusedSemanticHead(FeatureSpec.pyramid(4), conv_out_channels=4, num_classes=5, avg_non_ignore=True)
    expected = 0.2 * F.cross_entropy(logits, small, ignore_index=255)
    torch.testing.assert_close(head.loss(logits, full), expected)


def test_semantic_head_outputs_at_the_fusion_level():
    head = FusedSemanticHead(FeatureSpec.pyramid(4), conv_out_channels=6, num_classes=5)
    feats = [torch.randn(2, 4, 32 // 2 ** i, 40 // 2 ** i) for i in range(5)]
    seg, feat = head(feats)
    assert seg.shape == (2, 5, 16, 20) and feat.shape == (2, 6, 16, 20)
    assert (feat >= 0).all()  # conv_embedding is followed by a ReLU


# ---- HTC head at test time ----------------------------------------------------------------------------------
BBOX16 = partial(Shared2FCBBoxHead, fc_out_channels=16)
MASK8 = partial(FCNMaskHead, conv_channels=8, num_convs=2)


def tiny_htc(**kw) -> CascadeRoIHead:
    torch.manual_seed(0)
    return CascadeRoIHead(FeatureSpec.pyramid(8, 3), bbox_head=BBOX16, mask_head=MASK8,
                          semantic_head=partial(FusedSemanticHead, conv_out_channels=8, num_classes=5),
                          **{"interleaved": True, "mask_info_flow": True, "score_thr": 0.0, **kw}).eval()


def feats64() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(1, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]


PROPOSALS = torch.tensor([[10.0, 10.0, 40.0, 40.0, 0.9], [30.0, 5.0, 60.0, 30.0, 0.8]])


@pytest.mark.parametrize("info_flow", [True, False])
def test_mask_merge_mean_averages_the_stages_sigmoids_and_last_keeps_the_last(info_flow):
    head = tiny_htc(mask_info_flow=info_flow, interleaved=info_flow)
    feats = feats64()
    rois = torch.tensor([[0.0, 10, 10, 40, 40]])
    with torch.no_grad():
        sem = head.semantic(feats)[1]
        x = head._mask_feats(feats, rois, sem)
        probs, res = [], None
        for h in head.mask_head:
            logits, feat = h(x, res)
            res = feat if info_flow else None
            probs.append(logits.sigmoid())
        head.mask_merge = "mean"
        torch.testing.assert_close(head.mask_probs(feats, rois, sem), sum(probs) / 3)
        head.mask_merge = "last"
        torch.testing.assert_close(head.mask_probs(feats, rois, sem), probs[-1])


@pytest.mark.parametrize("merge", ["mean", "last"])
@pytest.mark.parametrize("info_flow", [True, False])
def test_mask_probs_of_given_labels_are_those_channels_of_all_classes(merge, info_flow):
    head = tiny_htc(mask_info_flow=info_flow, interleaved=info_flow, mask_merge=merge)
    feats = feats64()
    rois = torch.tensor([[0.0, 10, 10, 40, 40], [0.0, 30, 5, 60, 30], [0.0, 0, 0, 64, 64]])
    labels = torch.tensor([2, 0, 2])
    with torch.no_grad():
        sem = head.semantic(feats)[1]
        every_class = head.mask_probs(feats, rois, sem)
        selected = head.mask_probs(feats, rois, sem, labels)
    assert selected.shape == (3, 28, 28)
    torch.testing.assert_close(selected, every_class[torch.arange(3), labels], rtol=1e-5, atol=1e-6)


def test_predict_rescales_boxes_and_masks_to_the_original_frame():
    head = tiny_htc()
    meta = {"orig_size": (32, 40), "img_size": (64, 64), "scale_factor": (1.6, 2.0)}
    with torch.no_grad():
        orig = head.predict(feats64(), [PROPOSALS], [meta])[0]
        resized = head.predict(feats64(), [PROPOSALS], [meta], rescale=False)[0]
    assert len(orig) > 0
    torch.testing.assert_close(orig.boxes, resized.boxes / torch.tensor([1.6, 2.0, 1.6, 2.0]))
    torch.testing.assert_close(orig.scores, resized.scores)
    assert orig.masks.shape[1:] == (32, 40) and resized.masks.shape[1:] == (64, 64)
    assert orig.masks.dtype == torch.bool


def test_predict_without_proposals_returns_empty_detections():
    head = tiny_htc()
    meta = {"orig_size": (50, 60), "img_size": (64, 64), "scale_factor": (1.0, 1.0)}
    det = head.predict(feats64(), [torch.zeros(0, 5)], [meta])[0]
    assert len(det) == 0 and det.masks.shape == (0, 50, 60)


def test_box_only_head_has_no_mask_modules_and_predicts_no_masks():
    head = CascadeRoIHead(FeatureSpec.pyramid(8, 3), bbox_head=BBOX16, mask_head=None, mask_info_flow=False,
                          interleaved=False, score_thr=0.0).eval()
    assert not hasattr(head, "mask_head")
    meta = {"orig_size": (64, 64), "img_size": (64, 64), "scale_factor": (1.0, 1.0)}
    with torch.no_grad():
        det = head.predict(feats64(), [PROPOSALS], [meta])[0]
    assert det.masks is None and len(det) > 0


def test_box_stage_with_semantic_fusion_requires_the_semantic_feature():
    head = tiny_htc()
    with pytest.raises(ValueError, match="semantic_feat"):
        head.box_stage(0, feats64(), torch.tensor([[0.0, 10, 10, 40, 40]]))


def test_full_size_htc_roi_head_has_mmdets_parameter_count():
    # mmdet 3.3.0 htc_r50_fpn_1x_coco: roi_head 52,811,942 parameters (detector 80,258,293)
    head = CascadeRoIHead(FeatureSpec.pyramid(256), semantic_head=FusedSemanticHead, interleaved=True,
                          mask_info_flow=True)
    assert sum(p.numel() for p in head.parameters()) == 52_811_942


# ---- Mask R-CNN's box head (num_stages=1): per-class regression and L1 loss ---------------------------------
def test_class_specific_regression_is_trained_on_the_gt_class_deltas_with_l1():
    head = Shared2FCBBoxHead(FeatureSpec.pyramid(2, 3), fc_out_channels=8, reg_class_agnostic=False,
                             bbox_loss="l1")
    assert head.fc_reg.out_features == 12
    s = sampling([[0, 0, 10, 10]], [[1, 1, 11, 11]], [1], [[20, 20, 30, 30]])
    bbox_pred = torch.zeros(2, 12)
    bbox_pred[0, 0:4] = 5.0  # the deltas of classes 0 and 2 must not matter
    bbox_pred[0, 8:12] = -5.0
    losses = head.loss(torch.randn(2, 4), bbox_pred, *head.targets([s]))
    # targets (1, 1, 0, 0), class-1 deltas 0: L1 sum 2 over 2 sampled RoIs
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(1.0))


def test_class_specific_regress_uses_the_given_labels():
    head = Shared2FCBBoxHead(FeatureSpec.pyramid(2, 2), fc_out_channels=8, reg_class_agnostic=False,
                             target_stds=(1, 1, 1, 1))
    rois = torch.tensor([[0.0, 0, 0, 10, 10]])
    deltas = torch.tensor([[0.0, 0, 0, 0, 1.0, 0, 0, 0]])
    torch.testing.assert_close(head.regress(rois, deltas, [(100, 100)], torch.tensor([1])),
                               torch.tensor([[10.0, 0, 20, 10]]))
    assert head.regress(rois, deltas, [(100, 100)]).shape == (1, 8)  # every class's box


def test_mask_rcnn_configuration_predicts_with_per_class_boxes():
    torch.manual_seed(0)
    head = CascadeRoIHead(FeatureSpec.pyramid(8, 3), bbox_head=partial(BBOX16, reg_class_agnostic=False),
                          mask_head=MASK8, num_stages=1, stage_loss_weights=(1,), iou_thresholds=(0.5,),
                          target_stds=((.1, .1, .2, .2),), interleaved=False, mask_info_flow=False,
                          score_thr=0.0).eval()
    meta = {"orig_size": (64, 64), "img_size": (64, 64), "scale_factor": (1.0, 1.0)}
    with torch.no_grad():
        det = head.predict(feats64(), [PROPOSALS], [meta])[0]
    assert len(det) == 2 * 3  # two proposals, three classes, nothing suppressed across classes
    assert det.boxes.shape == (6, 4) and det.masks.shape == (6, 64, 64)
