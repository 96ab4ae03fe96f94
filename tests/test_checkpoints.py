import pickle
from pathlib import Path

import pytest
import torch

from htc_lightning.checkpoints.mmdet import convert_mmdet_state_dict, read_checkpoint


def test_convmodule_conv_level_is_dropped_where_mmdet_wraps_convs():
    sd = {k: torch.zeros(1) for k in [
        "neck.lateral_convs.0.conv.weight", "neck.fpn_convs.3.conv.bias",
        "roi_head.mask_head.2.convs.1.conv.weight", "roi_head.mask_head.1.conv_res.conv.weight",
        "roi_head.semantic_head.conv_embedding.conv.weight", "roi_head.semantic_head.lateral_convs.4.conv.bias",
        "roi_head.semantic_head.conv_logits.weight", "rpn_head.feature_adaption.conv_offset.weight",
        "backbone.layer3.0.conv2.conv_offset.weight", "roi_head.bbox_head.0.shared_fcs.1.weight"]}
    assert sorted(convert_mmdet_state_dict(sd)) == sorted([
        "neck.lateral_convs.0.weight", "neck.fpn_convs.3.bias",
        "roi_head.mask_head.2.convs.1.weight", "roi_head.mask_head.1.conv_res.weight",
        "roi_head.semantic_head.conv_embedding.weight", "roi_head.semantic_head.lateral_convs.4.bias",
        "roi_head.semantic_head.conv_logits.weight", "rpn_head.feature_adaption.conv_offset.weight",
        "backbone.layer3.0.conv2.conv_offset.weight", "roi_head.bbox_head.0.shared_fcs.1.weight"])


def test_v1_checkpoints_move_the_background_class_last_and_drop_its_mask_channel():
    fc_cls = torch.arange(4.0)[:, None]  # background + 3 classes
    logits = torch.arange(4.0)[:, None, None, None]
    out = convert_mmdet_state_dict({"roi_head.bbox_head.0.fc_cls.weight": fc_cls,
                                    "roi_head.mask_head.0.conv_logits.weight": logits}, "v1", num_classes=3)
    assert out["roi_head.bbox_head.0.fc_cls.weight"].flatten().tolist() == [1, 2, 3, 0]
    assert out["roi_head.mask_head.0.conv_logits.weight"].flatten().tolist() == [1, 2, 3]


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_model_zoo_files_load_with_their_meta_but_arbitrary_pickles_are_refused(tmp_path):
    good = tmp_path / "zoo.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ("person", "car"), "config": "model = dict()"},
                "state_dict": {"neck.fpn_convs.0.conv.weight": torch.ones(2)}}, good)
    assert list(read_checkpoint(good)) == ["neck.fpn_convs.0.conv.weight"]
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {}, "meta": _Evil()}, f)
    with pytest.raises(ValueError, match="evil.pth"):
        read_checkpoint(bad)


def test_mask_rcnn_single_heads_map_onto_our_one_stage_lists():
    sd = {k: torch.zeros(1) for k in ["roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.shared_fcs.0.bias",
                                      "roi_head.mask_head.convs.2.conv.weight", "roi_head.mask_head.upsample.weight",
                                      "bbox_head.conv_loc.weight"]}
    assert sorted(convert_mmdet_state_dict(sd)) == sorted([
        "roi_head.bbox_head.0.fc_cls.weight", "roi_head.bbox_head.0.shared_fcs.0.bias",
        "roi_head.mask_head.0.convs.2.weight", "roi_head.mask_head.0.upsample.weight", "rpn_head.conv_loc.weight"])


def test_v1_per_class_box_regression_drops_the_background_rows():
    fc_reg = torch.arange(16.0)[:, None]  # 4 rows for background + 4 for each of 3 classes
    out = convert_mmdet_state_dict({"roi_head.bbox_head.0.fc_cls.weight": torch.zeros(4, 1),
                                    "roi_head.bbox_head.0.fc_reg.weight": fc_reg,
                                    "roi_head.bbox_head.0.fc_reg.bias": fc_reg[:, 0]}, "v1")
    assert out["roi_head.bbox_head.0.fc_reg.weight"].flatten().tolist() == list(range(4, 16))
    assert out["roi_head.bbox_head.0.fc_reg.bias"].tolist() == list(range(4, 16))


def test_per_class_box_regression_loads_into_a_class_specific_head():
    from htc_lightning.checkpoints.mmdet import load_mmdet_checkpoint
    from htc_lightning.tools.mmdet_parity import build_detector

    ours = build_detector(str(Path(__file__).parents[1] / "configs/parity/mask_rcnn_tiny.yaml"), ["num_classes=3"])
    assert ours.roi_head.bbox_head[0].fc_reg.out_features == 12
    theirs = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    report = load_mmdet_checkpoint(ours, theirs)
    assert report.ok and torch.equal(ours.roi_head.bbox_head[0].fc_reg.weight,
                                     theirs["roi_head.bbox_head.0.fc_reg.weight"])
