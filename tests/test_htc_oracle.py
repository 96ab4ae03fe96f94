"""HTC / Cascade Mask R-CNN RoI head against mmdetection 3.3.0 dumps (tests/fixtures/oracle, see
../shared/oracle/README.md): each box stage on the reference RoIs, the semantic head on the reference FPN
features, and the whole test-time cascade on the reference proposals."""
from functools import partial
from pathlib import Path

import pytest
import torch

from htc_lightning.checkpoints.mmdet import convert_mmdet_state_dict
from htc_lightning.models.interfaces import FeatureSpec
from htc_lightning.models.layers.assigners import MaxIoUAssigner
from htc_lightning.models.roi_heads import CascadeRoIHead, FCNMaskHead, FusedSemanticHead, Shared2FCBBoxHead
from htc_lightning.tools.compare import assert_close_to_reference, score_tolerance
from htc_lightning.tools.mmdet_parity import Report, compare_detections

pytestmark = pytest.mark.reference
ORACLE = Path(__file__).parent / "fixtures" / "oracle"

# dump -> how mmdet 3.3.0 built it: HTC keeps the last stage's mask at test time, Cascade Mask R-CNN
# averages the three stages' sigmoid masks (CascadeRoIHead.predict_mask -> merge_aug_masks).
DUMPS = {
    "tiny_htc_s0": "htc", "tiny_htc_s3": "htc", "tiny_htc_nosem_s0": "htc_nosem",
    "tiny_cascade_s0": "cascade", "tiny_cascade_s1": "cascade",
}
# HTC with and without rescaling (s3 is resized by 1.1), and Cascade's mean-of-stages masks
PREDICT_ON = {"tiny_htc_s0", "tiny_htc_s3", "tiny_cascade_s0"}


def tiny_head(kind: str) -> CascadeRoIHead:
    """The dumps' ``--tiny`` widths (32-channel FPN and heads, 64-wide fcs) and test config (score_thr 0.001)."""
    cascade = kind == "cascade"
    return CascadeRoIHead(FeatureSpec.pyramid(32), bbox_head=partial(Shared2FCBBoxHead, fc_out_channels=64),
                          mask_head=partial(FCNMaskHead, conv_channels=32),
                          semantic_head=partial(FusedSemanticHead, conv_out_channels=32) if kind == "htc" else None,
                          interleaved=not cascade, mask_info_flow=not cascade,
                          assigner=partial(MaxIoUAssigner, match_low_quality=not cascade),
                          mask_merge="mean" if cascade else "last", score_thr=0.001)


def roi_head_state(dump: dict) -> dict:
    sd = convert_mmdet_state_dict(dump["state_dict"])
    return {k[len("roi_head."):]: v for k, v in sd.items() if k.startswith("roi_head.")}


def _load_case(name: str, device: str = "cpu"):
    dump = torch.load(ORACLE / f"{name}.pt", weights_only=False)
    head = tiny_head(DUMPS[name]).eval()
    head.load_state_dict(roi_head_state(dump), strict=True)
    return name, dump, head.to(device), [f.float().to(device) for f in dump["fpn"]]


@pytest.fixture(scope="module", params=sorted(DUMPS))
def case(request):
    return _load_case(request.param)


# the whole cascade (NMS, masks) runs on a subset here; tests/test_mmdet_parity.py runs it on every dump
@pytest.fixture(scope="module", params=sorted(PREDICT_ON))
def predict_case(request):
    return _load_case(request.param)


def test_state_dict_keys_are_mmdets(case):
    _, dump, head, _ = case
    assert set(head.state_dict()) == set(roi_head_state(dump))


def test_box_stages_match_on_reference_rois(case, device):
    _, dump, head, feats = case
    head, feats = head.to(device), [f.to(device) for f in feats]
    sem = dump["semantic"]["feat"].float().to(device) if "semantic" in dump else None
    with torch.no_grad():
        for st in dump["stages"]:
            t = int(st["stage"])
            cls_score, bbox_pred = head.box_stage(t, feats, st["rois"].float().to(device), sem)
            assert_close_to_reference(cls_score, st["cls_score"].float(), msg=f"stage {t} cls_score")
            assert_close_to_reference(bbox_pred, st["bbox_pred"].float(), msg=f"stage {t} bbox_pred")


@pytest.mark.parametrize("name", sorted(n for n, kind in DUMPS.items() if kind == "htc"))
def test_semantic_head_matches(name, device):
    _, dump, head, feats = _load_case(name, device)
    with torch.no_grad():
        seg_pred, feat = head.semantic(feats)
    assert_close_to_reference(seg_pred, dump["semantic"]["seg_pred"].float(), msg="seg_pred")
    assert_close_to_reference(feat, dump["semantic"]["feat"].float(), msg="semantic feat")


def test_predict_matches_final_detections_and_masks(predict_case, device):
    name, dump, head, feats = predict_case
    head, feats = head.to(device), [f.to(device) for f in feats]
    m = dump["img_metas"][0]
    meta = {"orig_size": tuple(m["ori_shape"][:2]), "img_size": tuple(m["img_shape"][:2]),
            "scale_factor": tuple(m["scale_factor"])}
    with torch.no_grad():
        det = head.predict(feats, [p.float().to(device) for p in dump["proposals"]], [meta])[0]
    assert tuple(det.masks.shape) == tuple(dump["result"]["masks_shape"])  # pasted at the original image size
    rep = Report()
    compare_detections(det, dump["result"], rep, head,
                       score_tol=score_tolerance(max(float(st["cls_score"].abs().max()) for st in dump["stages"])))
    assert not rep.failed and len(rep.lines) == 2, "\n".join(rep.lines)  # detections, then masks
