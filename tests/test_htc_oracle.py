"""HTC / Cascade Mask R-CNN RoI head against mmdetection 3.3.0 dumps (tests/fixtures/oracle, see
../shared/oracle/README.md): each box stage on the reference RoIs, the semantic head on the reference FPN
features, and the whole test-time cascade on the reference proposals."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from htc_lightning.checkpoints.mmdet import convert_mmdet_state_dict
from htc_lightning.models.roi_heads import FusedSemanticHead, HTCRoIHead

ORACLE = Path(__file__).parent / "fixtures" / "oracle"
ATOL = 1e-4

# dump -> how mmdet 3.3.0 built it: HTC keeps the last stage's mask at test time, Cascade Mask R-CNN
# averages the three stages' sigmoid masks (CascadeRoIHead.predict_mask -> merge_aug_masks).
DUMPS = {
    "tiny_htc_s0": "htc", "tiny_htc_s3": "htc", "tiny_htc_nosem_s0": "htc_nosem",
    "tiny_cascade_s0": "cascade", "tiny_cascade_s1": "cascade",
}
# HTC with and without rescaling (s3 is resized by 1.1), and Cascade's mean-of-stages masks
PREDICT_ON = {"tiny_htc_s0", "tiny_htc_s3", "tiny_cascade_s0"}


def tiny_head(kind: str) -> HTCRoIHead:
    """The dumps' ``--tiny`` widths (32-channel FPN and heads, 64-wide fcs) and test config (score_thr 0.001)."""
    cascade = kind == "cascade"
    return HTCRoIHead(in_channels=32, fc_out_channels=64, mask_conv_channels=32,
                      semantic_head=FusedSemanticHead(in_channels=32, conv_out_channels=32) if kind == "htc" else None,
                      interleaved=not cascade, mask_info_flow=not cascade, match_low_quality=not cascade,
                      mask_merge="mean" if cascade else "last", score_thr=0.001)


def roi_head_state(dump: dict) -> dict:
    sd = convert_mmdet_state_dict(dump["state_dict"])
    return {k[len("roi_head."):]: v for k, v in sd.items() if k.startswith("roi_head.")}


def _load_case(name: str):
    dump = torch.load(ORACLE / f"{name}.pt", weights_only=False)
    head = tiny_head(DUMPS[name]).eval()
    head.load_state_dict(roi_head_state(dump), strict=True)
    return name, dump, head, [f.float() for f in dump["fpn"]]


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


def test_box_stages_match_on_reference_rois(case):
    _, dump, head, feats = case
    sem = dump["semantic"]["feat"].float() if "semantic" in dump else None
    with torch.no_grad():
        for st in dump["stages"]:
            cls_score, bbox_pred = head.box_stage(int(st["stage"]), feats, st["rois"].float(), sem)
            torch.testing.assert_close(cls_score, st["cls_score"].float(), atol=ATOL, rtol=0)
            torch.testing.assert_close(bbox_pred, st["bbox_pred"].float(), atol=ATOL, rtol=0)


def test_semantic_head_matches(case):
    _, dump, head, feats = case
    if "semantic" not in dump:
        assert head.semantic(feats) is None
        return
    with torch.no_grad():
        seg_pred, feat = head.semantic(feats)
    torch.testing.assert_close(seg_pred, dump["semantic"]["seg_pred"].float(), atol=ATOL, rtol=0)
    torch.testing.assert_close(feat, dump["semantic"]["feat"].float(), atol=ATOL, rtol=0)


def test_predict_matches_final_detections_and_masks(predict_case):
    name, dump, head, feats = predict_case
    m = dump["img_metas"][0]
    meta = {"orig_size": tuple(m["ori_shape"][:2]), "img_size": tuple(m["img_shape"][:2]),
            "scale_factor": tuple(m["scale_factor"])}
    with torch.no_grad():
        det = head.predict(feats, [p.float() for p in dump["proposals"]], [meta])[0]
    ref = dump["result"]
    rb, rs, rl = ref["bboxes"].double(), ref["scores"].double(), ref["labels"].long()
    assert len(det) == len(rb)
    ok = ((box_iou(rb, det.boxes.double()) > 0.99) & ((rs[:, None] - det.scores.double()[None]).abs() <= ATOL)
          & (rl[:, None] == det.labels[None]))
    assert bool(ok.any(1).all()), f"{int((~ok.any(1)).sum())} reference detections have no match"
    shape = ref["masks_shape"]
    assert tuple(det.masks.shape) == tuple(shape)  # pasted at the original image size
    ref_masks = torch.from_numpy(np.unpackbits(ref["masks_packed"].numpy(), axis=-1, count=shape[-1])
                                 .astype(bool).reshape(shape))
    match = ok.float().argmax(1)
    for r in range(len(rb)):
        a, b = ref_masks[r], det.masks[match[r]]
        union = int((a | b).sum())
        assert union == 0 or int((a & b).sum()) / union > 0.99, f"detection {r}: mask IoU too low"
