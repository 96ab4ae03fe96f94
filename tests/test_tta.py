"""Test-time augmentation (multi-scale + flip, mmdet 2.x HTC ``aug_test``): box mapping, view sizes, proposal
merging, equality with plain inference for the identity view, mirror consistency, Soft-NMS, module wiring."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import TinyCocoDataModule, fake_cli_config

from htc_lightning.cli import HTCLightningCLI
from htc_lightning.models.backbones import TimmBackbone
from htc_lightning.models.detector import Detector
from htc_lightning.models.layers.nms import multiclass_nms
from htc_lightning.models.necks.fpn import FPN
from htc_lightning.models.proposals.postprocess import merge_view_proposals
from htc_lightning.models.proposals.rpn import RPN
from htc_lightning.models.roi_heads import FCNMaskHead, Shared2FCBBoxHead
from htc_lightning.models.roi_heads.cascade import CascadeRoIHead
from htc_lightning.models.roi_heads.semantic_head import FusedSemanticHead
from htc_lightning.module import DetectionModule
from htc_lightning.tta import (
    TestTimeAugmentation,
    View,
    boxes_from_view,
    boxes_to_view,
    flip_boxes,
)

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
# a 60 x 90 original shown at the (96, 64) test scale: 64 x 96, scale factor 16/15 on both axes
META = {"image_id": 7, "orig_size": (60, 90), "img_size": (64, 96), "pad_size": (64, 96),
        "scale_factor": (96 / 90, 64 / 60), "flip": False}


def tiny_detector(with_semantic: bool = True, roi_head: bool = True, num_classes: int = NUM_CLASSES,
                  **head_kw) -> Detector:
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18", frozen_stages=-1, norm_eval=False,
                            model_kwargs={"channels": [8, 8, 16, 16], "stem_width": 8})
    head = None
    if roi_head:
        semantic = partial(FusedSemanticHead, conv_out_channels=16, num_classes=5) if with_semantic else None
        head_kw.setdefault("score_thr", 0.05)
        head_kw.setdefault("mask_head", partial(FCNMaskHead, conv_channels=16, num_convs=2))
        head_kw.setdefault("interleaved", True)
        head_kw.setdefault("mask_info_flow", True)
        head = partial(CascadeRoIHead, bbox_head=partial(Shared2FCBBoxHead, fc_out_channels=32),
                       semantic_head=semantic, semantic_fusion=("bbox", "mask"), **head_kw)
    rpn = partial(RPN, feat_channels=16, test_nms_pre=200, test_max_per_img=50)
    return Detector(backbone, partial(FPN, out_channels=16, num_outs=5), rpn, head, num_classes=num_classes).eval()


def image(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 64, 96, generator=g)


def assert_same_detections(a, b, exact: bool = True) -> None:
    assert len(a) == len(b)
    if exact:
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    else:
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    assert torch.equal(a.labels, b.labels)
    assert (a.masks is None) == (b.masks is None)
    if a.masks is not None:
        assert a.masks.shape == b.masks.shape
        if exact:
            assert torch.equal(a.masks, b.masks)
        else:
            union = (a.masks | b.masks).sum()
            assert float((a.masks & b.masks).sum()) >= 0.99 * float(union)


def mirror(det, width: int):
    """The detections of the mirrored image that ``det`` predicts (boxes and masks mirrored)."""
    return type(det)(flip_boxes(det.boxes, width), det.scores, det.labels,
                     None if det.masks is None else det.masks.flip(-1))


# ---- box mapping ---------------------------------------------------------------------------------------------
def test_flipping_boxes_twice_gives_them_back_in_float():
    boxes = torch.tensor([[0.3, 1.7, 10.25, 20.9], [33.1, 0.0, 89.9, 59.5]])
    torch.testing.assert_close(flip_boxes(flip_boxes(boxes, 90), 90), boxes)
    # mmdet 2.x mirrors about W (x' = W - x), without the -1 of mmdet 1.x and without rounding
    assert flip_boxes(boxes, 90)[0].tolist() == pytest.approx([90 - 10.25, 1.7, 90 - 0.3, 20.9])


def test_flip_leaves_the_score_column_alone():
    proposals = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.7]])
    assert flip_boxes(proposals, 10)[0].tolist() == pytest.approx([7.0, 2.0, 9.0, 4.0, 0.7])


def test_a_box_detected_in_a_flipped_view_maps_back_to_its_mirror_box():
    view = View(size=(128, 192), flip=True, factor=(2.0, 2.0))
    box = torch.tensor([[10.0, 20.0, 30.0, 50.0]])  # reference frame, 96 wide
    in_view = boxes_to_view(box, view)
    assert in_view[0].tolist() == [192 - 60.0, 40.0, 192 - 20.0, 100.0]
    torch.testing.assert_close(boxes_from_view(in_view, view), box)
    # the mirror image of the object is where an unflipped view of the mirrored image would see it
    mirrored_view = View(size=(128, 192), flip=False, factor=(2.0, 2.0))
    torch.testing.assert_close(boxes_from_view(in_view, mirrored_view), flip_boxes(box, 96))


def test_class_specific_boxes_map_per_class():
    view = View(size=(64, 96), flip=True, factor=(0.5, 1.0))
    boxes = torch.rand(5, NUM_CLASSES, 4) * 40 + torch.tensor([0.0, 0.0, 40.0, 20.0])
    mapped = boxes_from_view(boxes, view)
    torch.testing.assert_close(mapped, boxes_from_view(boxes.view(-1, 4), view).view(5, NUM_CLASSES, 4))


# ---- views ---------------------------------------------------------------------------------------------------
def test_views_follow_mmcv_rescale_from_the_original_size_scale_by_scale_unflipped_then_flipped():
    tta = TestTimeAugmentation(scales=[(900, 600), (2100, 1400)], flip=True)
    meta = {"orig_size": (480, 640), "img_size": (800, 1067), "scale_factor": (1067 / 640, 800 / 480)}
    views = tta.views(meta)
    # 480 x 640 in (900, 600): factor min(900 / 640, 600 / 480) = 1.25 -> 600 x 800
    # in (2100, 1400): min(2100 / 640, 1400 / 480) = 2.9167 -> int(x * f + 0.5) = 1400 x 1867
    assert [(v.size, v.flip) for v in views] == [((600, 800), False), ((600, 800), True),
                                                 ((1400, 1867), False), ((1400, 1867), True)]
    fx, fy = views[0].factor
    assert fx == pytest.approx(800 / 640 / (1067 / 640)) and fy == pytest.approx(600 / 480 / (800 / 480))


def test_view_at_the_batch_size_is_the_batch_image_itself_and_others_are_resized_flipped_and_padded():
    tta = TestTimeAugmentation(scales=[(96, 64), (90, 60)], flip=True)
    img = torch.zeros(3, 64, 128)  # batch padded wider than this image
    img[:, :, :96] = image()
    same, same_flipped, small, small_flipped = tta.views(META)
    assert same.is_reference and same.factor == (1.0, 1.0)
    assert tta.view_image(img, META, same).data_ptr() == img.data_ptr()
    flipped = tta.view_image(img, META, same_flipped)
    assert flipped.shape == (1, 3, 64, 96)
    assert torch.equal(flipped[0], img[:, :, :96].flip(-1))
    x = tta.view_image(img, META, small_flipped)
    assert small.size == (60, 90) and x.shape == (1, 3, 64, 96)  # padded to 32
    expected = torch.nn.functional.interpolate(img[None, :, :, :96], size=(60, 90), mode="bilinear",
                                               align_corners=False).flip(-1)
    assert torch.equal(x[:, :, :60, :90], expected)
    assert not x[:, :, 60:].any() and not x[:, :, :, 90:].any()


def test_bad_scales_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        TestTimeAugmentation(scales=[])
    with pytest.raises(ValueError, match="positive"):
        TestTimeAugmentation(scales=[(0, 100)])


def test_scales_are_long_short_as_the_datamodules_and_a_short_long_pair_is_an_error():
    assert TestTimeAugmentation(scales=[(1333, 800), (800, 800)]).scales == [(1333, 800), (800, 800)]
    with pytest.raises(ValueError, match=r"\[\(600, 900\)\] are \(short, long\)"):
        TestTimeAugmentation(scales=[(900, 600), (600, 900)])


def test_views_need_the_scale_factor_and_say_which_image_lacks_it():
    meta = {k: v for k, v in META.items() if k != "scale_factor"}
    with pytest.raises(ValueError, match="image 7: .*'scale_factor'"):
        TestTimeAugmentation(scales=[(96, 64)]).views(meta)


# ---- proposal merging ----------------------------------------------------------------------------------------
def test_merging_proposals_suppresses_overlaps_across_views_and_keeps_the_best():
    view_a = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9], [50.0, 50.0, 60.0, 60.0, 0.3]])
    view_b = torch.tensor([[0.5, 0.0, 10.0, 10.0, 0.95], [20.0, 20.0, 30.0, 30.0, 0.5]])
    merged = merge_view_proposals([view_a, view_b], iou_threshold=0.7, max_num=10)
    assert merged[:, 4].tolist() == pytest.approx([0.95, 0.5, 0.3])
    assert merge_view_proposals([view_a, view_b], 0.7, max_num=2)[:, 4].tolist() == pytest.approx([0.95, 0.5])


def test_the_views_proposals_are_merged_by_the_proposal_generators_own_merge(monkeypatch):
    detector = tiny_detector(roi_head=False)
    calls = []

    def recording_merge(proposals):
        calls.append(len(proposals))
        return merge_view_proposals(proposals, 0.7, 3)

    monkeypatch.setattr(detector.rpn_head, "merge_proposals", recording_merge)
    dets = TestTimeAugmentation(scales=[(96, 64)], flip=True).predict(detector, image()[None], [META])[0]
    assert calls == [2] and len(dets) == 3


def test_a_single_view_keeps_its_proposals_untouched():
    # overlapping proposals of two FPN levels survive the RPN's per-level NMS: one view is plain inference
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9], [0.0, 0.0, 10.0, 10.5, 0.8]])
    assert torch.equal(merge_view_proposals([props], 0.7, 1000), props)


# ---- whole detector ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"with_semantic": False, "mask_merge": "last"}, {"mask_head": None,
                                                                                       "mask_info_flow": False}])
def test_one_view_at_the_test_scale_without_flip_is_plain_inference_exactly(kw):
    detector = tiny_detector(**kw)
    images = image()[None]
    plain = detector.predict(images, [META])[0]
    assert len(plain) > 0
    tta = TestTimeAugmentation(scales=[(96, 64)], flip=False)
    assert_same_detections(tta.predict(detector, images, [META])[0], plain)


def test_proposal_only_detector_merges_proposals_only():
    detector = tiny_detector(roi_head=False)
    images = image()[None]
    plain = detector.predict(images, [META])[0]
    assert_same_detections(TestTimeAugmentation(scales=[(96, 64)], flip=False).predict(detector, images,
                                                                                            [META])[0], plain)
    merged = TestTimeAugmentation(scales=[(96, 64), (180, 120)], flip=True).predict(detector, images, [META])[0]
    assert 0 < len(merged) <= detector.rpn_head.test_settings.max_per_img
    assert (merged.labels == 0).all() and bool((merged.scores[:-1] >= merged.scores[1:]).all())
    # proposals of every view come back in the original frame (a 60 x 90 image), none left at view scale
    assert float(merged.boxes[:, 2].max()) <= 90 + 1e-3 and float(merged.boxes[:, 3].max()) <= 60 + 1e-3


def test_flip_tta_of_a_mirrored_image_is_the_mirror_of_flip_tta_of_the_image():
    # A conv net with random kernels is not mirror-equivariant, so flip-TTA of a symmetric image need not equal
    # plain inference. What must hold: the views of the mirrored image are the views of the image with their
    # roles swapped, so its merged detections are the mirror of the image's, up to the float rounding of
    # x -> W - x. This checks the proposal, box and mask un-flipping end to end.
    detector = tiny_detector()
    tta = TestTimeAugmentation(scales=[(96, 64), (180, 120)], flip=True)
    img = image(3)
    dets = tta.predict(detector, img[None], [META])[0]
    dets_mirrored = tta.predict(detector, img.flip(-1)[None], [META])[0]
    assert len(dets) > 0
    assert_same_detections(dets_mirrored, mirror(dets, 90), exact=False)


def test_flip_view_is_inference_on_the_mirrored_image_mapped_back():
    detector = tiny_detector()
    img = image()
    tta = TestTimeAugmentation(scales=[(96, 64)], flip=True)
    plain_view, flip_view = tta.views(META)
    assert plain_view.is_reference and flip_view.flip and flip_view.size == (64, 96)
    run = tta.run_view(detector, img, META, flip_view)
    rpn = detector.rpn_head
    mirrored = rpn.proposals(rpn(detector.extract_feats(img.flip(-1)[None])), [(64, 96)], rpn.test_settings)[0]
    assert len(mirrored) > 0
    assert torch.equal(run.proposals[:, :4], flip_boxes(mirrored[:, :4], 96))
    assert torch.equal(run.proposals[:, 4], mirrored[:, 4])
    dets = tta.predict(detector, img[None], [META])[0]
    assert len(dets) > 0 and dets.masks.shape[1:] == (60, 90)
    assert float(dets.boxes[:, 2].max()) <= 90 + 1e-3 and float(dets.boxes[:, 3].max()) <= 60 + 1e-3


def test_soft_nms_of_the_roi_head_is_used_under_tta():
    soft = tiny_detector(nms_type="soft_nms_linear", nms_iou=0.3)
    tta = TestTimeAugmentation(scales=[(96, 64), (180, 120)], flip=True)
    images = image()[None]
    dets = tta.predict(soft, images, [META])[0]
    hard = tiny_detector(nms_type="nms", nms_iou=0.3)  # same seed, same weights
    dets_hard = tta.predict(hard, images, [META])[0]
    # Soft-NMS decays overlapping boxes instead of dropping them: more survive, some with decayed scores that
    # no hard-NMS detection has (hard NMS keeps the merged scores unchanged)
    assert len(dets) > len(dets_hard)
    assert not set(dets.scores.tolist()) <= set(dets_hard.scores.tolist())


def test_soft_nms_under_tta_equals_soft_nms_on_the_merged_boxes():
    detector = tiny_detector(nms_type="soft_nms_gaussian", nms_iou=0.3, mask_head=None, mask_info_flow=False)
    tta = TestTimeAugmentation(scales=[(96, 64)], flip=True)
    images = image()[None]
    dets = tta.predict(detector, images, [META])[0]
    # the merged boxes and scores, rebuilt from the two views through the public pieces
    head = detector.roi_head
    with torch.no_grad():
        views = tta.views(META)
        runs = [tta.run_view(detector, images[0], META, v) for v in views]
        proposals = detector.rpn_head.merge_proposals([r.proposals for r in runs])
        outs = [head.refine_and_score(r.feats, torch.cat([proposals.new_zeros(len(proposals), 1),
                                                           boxes_to_view(proposals[:, :4], v)], 1),
                                      [v.size], r.semantic_feat) for v, r in zip(views, runs)]
    scores = (outs[0][0] + outs[1][0])[:, :-1] / 2
    boxes = (boxes_from_view(outs[0][1], views[0]) + boxes_from_view(outs[1][1], views[1])) / 2
    boxes = boxes / torch.tensor(META["scale_factor"] * 2)
    expected = multiclass_nms(boxes, scores, head.score_thr, 0.3, head.max_per_img, "soft_nms_gaussian")
    assert len(dets) > 0
    torch.testing.assert_close(dets.boxes, expected[0])
    torch.testing.assert_close(dets.scores, expected[1])
    assert torch.equal(dets.labels, expected[2])


# ---- Lightning module / CLI ----------------------------------------------------------------------------------
class RecordingTTA(TestTimeAugmentation):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def predict(self, detector, images, metas):
        self.batches.append(len(metas))
        return super().predict(detector, images, metas)


def test_module_test_step_runs_the_detector_through_tta(tmp_path):
    detector = tiny_detector(num_classes=2)  # the datamodule's two categories
    tta = RecordingTTA(scales=[(64, 64)], flip=True)
    module = DetectionModule(detector, log_images=0, tta=tta)
    dm = TinyCocoDataModule(str(tmp_path / "d"), num_val=3, val_batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    metrics = trainer.test(module, dm, verbose=False)[0]
    assert tta.batches == [2, 1]
    assert "test/bbox_mAP" in metrics and "test/segm_mAP" in metrics
    predictions = trainer.predict(module, dm)
    assert tta.batches == [2, 1, 2, 1] and len(predictions[0]) == 2


class DelegatingTTA(TestTimeAugmentation):
    """Records the batches and returns plain inference (the CLI test's fake detector has no RPN to augment)."""

    calls: list[int] = []

    def predict(self, detector, images, metas):
        DelegatingTTA.calls.append(len(metas))
        return detector.predict(images, metas)


def test_cli_test_of_a_checkpoint_uses_the_tta_given_at_test_time(tmp_path):
    config = fake_cli_config(tmp_path, max_steps=1, limit_val_batches=0)
    HTCLightningCLI(args=["fit", "--config", config])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # the checkpoint's hparams are applied over the test config: a stored "tta: null" would switch TTA off
    assert "tta" not in torch.load(ckpt, weights_only=False)["hyper_parameters"]
    DelegatingTTA.calls = []
    cli = HTCLightningCLI(args=["test", "--config", config, "--ckpt_path", str(ckpt),
                                "--model.tta", "test_tta.DelegatingTTA", "--model.tta.scales", "[[900, 600]]"])
    assert isinstance(cli.model.tta, DelegatingTTA) and cli.model.tta.scales == [(900, 600)]
    assert DelegatingTTA.calls == [2, 2]  # the four validation images, two per batch


def test_the_tta_configs_build_their_tta():
    for name in ("htc_r50_fpn_1x_coco_ms-flip", "htc_tiny_synthetic_ms-flip"):
        config = yaml.safe_load((ROOT / "configs" / "tta" / f"{name}.yaml").read_text())
        tta_config = config["model"]["init_args"]["tta"]
        assert tta_config["class_path"] == "htc_lightning.tta.TestTimeAugmentation"
        tta = TestTimeAugmentation(**tta_config["init_args"])
        test_scale = sorted(config["data"]["init_args"]["test_scale"])
        if name.startswith("htc_r50"):
            # COCO images come at the largest scale: every view is that image or a downscale of it
            assert test_scale == sorted(max(tta.scales, key=max))
        else:
            # the synthetic images' own size is the test scale; one view is the batch image itself
            assert test_scale in [sorted(s) for s in tta.scales]
