"""The RoI head's post-processing steps, the one path of ``predict`` and test-time augmentation: NMS with
mmdet's rescale rule, then (mask heads) the rescale and mask pasting."""
from functools import partial

import torch

from htc_lightning.models.interfaces import FeatureSpec
from htc_lightning.models.roi_heads import CascadeRoIHead, FCNMaskHead, Shared2FCBBoxHead
from htc_lightning.structures import Detections

# resized 64 x 64 from a 32 x 40 original: x / 1.6, y / 2
META = {"image_id": 3, "orig_size": (32, 40), "img_size": (64, 64), "scale_factor": (1.6, 2.0)}
BOXES = torch.tensor([[10.0, 10.0, 40.0, 40.0], [11.0, 10.0, 40.0, 40.0], [30.0, 5.0, 60.0, 30.0]])
# class scores of three boxes, background last: box 1 overlaps box 0 and loses to it in class 0
SCORES = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2]])


def head(with_mask: bool, **kw) -> CascadeRoIHead:
    mask_head = partial(FCNMaskHead, conv_channels=8, num_convs=1) if with_mask else None
    return CascadeRoIHead(FeatureSpec.pyramid(8, 2), bbox_head=partial(Shared2FCBBoxHead, fc_out_channels=16),
                          mask_head=mask_head, mask_info_flow=with_mask, score_thr=0.3, **kw).eval()


def test_box_only_head_suppresses_and_returns_boxes_in_the_original_frame():
    dets = head(with_mask=False).postprocess_boxes(SCORES, BOXES, META)
    assert dets.labels.tolist() == [0, 1] and torch.equal(dets.scores, SCORES[[0, 2], [0, 1]])
    torch.testing.assert_close(dets.boxes, BOXES[[0, 2]] / torch.tensor([1.6, 2.0, 1.6, 2.0]))
    assert dets.masks is None


def test_box_only_head_without_rescale_stays_in_the_resized_frame():
    dets = head(with_mask=False).postprocess_boxes(SCORES, BOXES, META, rescale=False)
    assert torch.equal(dets.boxes, BOXES[[0, 2]])


def test_mask_head_keeps_the_resized_frame_for_its_mask_rois():
    dets = head(with_mask=True).postprocess_boxes(SCORES, BOXES, META)
    assert torch.equal(dets.boxes, BOXES[[0, 2]]) and dets.masks is None


def test_the_nms_is_the_heads_own():
    # at IoU 0.5 box 1 (IoU 0.97 with box 0) goes under hard NMS and stays, decayed, under Soft-NMS
    hard = head(with_mask=False).postprocess_boxes(SCORES, BOXES, META)
    soft = head(with_mask=False, nms_type="soft_nms_linear").postprocess_boxes(SCORES, BOXES, META)
    assert len(hard) == 2 and len(soft) == 3


def test_no_boxes_give_empty_detections():
    dets = head(with_mask=False).postprocess_boxes(torch.zeros(0, 3), torch.zeros(0, 4), META)
    assert len(dets) == 0 and dets.labels.dtype == torch.long


def test_masks_are_pasted_in_the_original_frame_with_the_boxes_rescaled():
    h = head(with_mask=True)
    dets = Detections(BOXES[[0]], torch.tensor([0.9]), torch.tensor([0]))
    probs = torch.ones(1, 28, 28)
    out = h.postprocess_masks(dets, probs, META)
    torch.testing.assert_close(out.boxes, BOXES[[0]] / torch.tensor([1.6, 2.0, 1.6, 2.0]))
    assert out.masks.shape == (1, 32, 40) and out.masks.dtype == torch.bool
    # the box 10..40 resized is 6.25..25 x 5..20 original: the pasted mask covers it, nothing far outside
    assert out.masks[0, 10, 15] and not out.masks[0, 0, 0] and not out.masks[0, 30, 35]


def test_masks_without_rescale_are_pasted_at_the_resized_size():
    h = head(with_mask=True)
    dets = Detections(BOXES[[0]], torch.tensor([0.9]), torch.tensor([0]))
    out = h.postprocess_masks(dets, torch.ones(1, 28, 28), META, rescale=False)
    assert torch.equal(out.boxes, BOXES[[0]]) and out.masks.shape == (1, 64, 64)


def test_no_detections_give_empty_masks_at_the_original_size():
    dets = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    out = head(with_mask=True).postprocess_masks(dets, None, META)
    assert out.masks.shape == (0, 32, 40) and out.masks.dtype == torch.bool
