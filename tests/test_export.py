"""Export of the inference graph (torch.export and ONNX): the tiny HTC, Cascade Mask R-CNN and HTC + GA-RPN
configs exported with random weights, and checked against eager ``predict`` on three real photographs (COCO
val2017, tests/fixtures/export_images) at image sizes other than the traced one; the ``htc-lightning export``
command on a checkpoint written by ``fit``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from htc_lightning import export
from htc_lightning.cli import main
from htc_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from htc_lightning.tools.mmdet_parity import build_detector

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "tiny"
PHOTOS = Path(__file__).resolve().parent / "fixtures" / "export_images"
FAMILIES = {"htc": "htc_tiny_synthetic.yaml", "cascade_mask_rcnn": "cascade_tiny_synthetic.yaml",
            "htc_ga_rpn": "htc_ga-rpn_tiny_synthetic.yaml"}
TRACED = (128, 160)
# two photographs resized to fit (192, 224) pad to 192x224, the third to fit (256, 320) to 256x320: both other
# sizes than the traced example's 128x160
OTHER = ((192, 224), (256, 320))


def tiny_detector(family: str):
    # 4 classes: random softmax scores (~0.2) clear the 0.05 threshold, so every image keeps max_per_img boxes
    torch.manual_seed(0)
    return build_detector(str(CONFIGS / FAMILIES[family]), ["num_classes=4"]).eval()


def assert_checked(checks):
    assert len(checks) == 3
    for c in checks:
        assert c.ok, str(c)
        assert c.eager > 0 and c.matched > 0.9 * c.eager, str(c)  # not a vacuous check: detections were compared


@pytest.mark.parametrize("fmt", ["torch.export", pytest.param("onnx", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_tiny_model_matches_eager_inference_on_photographs(tmp_path, family, fmt, request):
    if (family, fmt) == ("htc_ga_rpn", "onnx"):
        # Found by the first full run (issue 29 note): at the traced size all 3 photographs match 100/100, but at
        # 192x224 one of them keeps 5 detections that eager does not (5 near-ties, 5 unexplained; the matched
        # boxes agree to 4.5e-9 of scale). Not yet explained: an upstream GA decision (location filter or
        # proposal NMS) at its boundary, or onnxruntime's DeformConv at another size. Open until it is.
        request.applymarker(pytest.mark.xfail(reason="GA-RPN through onnxruntime at a non-traced size: 5 of 100 "
                                                     "detections unexplained on one photograph (issue 29)"))
    detector = tiny_detector(family)
    photos = sorted(PHOTOS.glob("*.jpg"))
    report = export.export_detector(detector, fmt, TRACED, tmp_path, photos)
    assert (tmp_path / export.FILE_NAMES[fmt]).is_file()
    assert json.loads((tmp_path / "export.json").read_text())["check"] == report["check"]
    assert all(c["ok"] for c in report["check"])
    # dynamic image size: the same file at other sizes than the one it was traced at
    samples = (export.load_images(photos[:2], OTHER[0], IMAGENET_MEAN, IMAGENET_STD)
               + export.load_images(photos[2:], OTHER[1], IMAGENET_MEAN, IMAGENET_STD))
    sizes = {tuple(images.shape[-2:]) for images, _ in samples}
    assert export.padded(TRACED) not in sizes and len(sizes) == 2
    assert_checked(export.check(detector, export.Runner(tmp_path / export.FILE_NAMES[fmt]), samples))


def test_export_refuses_a_detector_without_mask_head():
    detector = build_detector(str(CONFIGS / "ga_rpn_tiny_synthetic.yaml"))
    with pytest.raises(ValueError, match="needs a RoI head with a mask head"):
        export.InferenceGraph(detector)


def test_export_refuses_soft_nms():
    detector = tiny_detector("htc")
    detector.roi_head.nms_type = "soft_nms_linear"
    with pytest.raises(ValueError, match="nms_type 'soft_nms_linear' is not exportable"):
        export.InferenceGraph(detector)


def test_export_command_and_predictor_export_on_a_fitted_checkpoint(tmp_path, coco_root):
    from test_cli_real_htc import tiny_htc_config

    from htc_lightning.cli import HTCLightningCLI

    config = tiny_htc_config(tmp_path, coco_root, limit_val_batches=0)
    HTCLightningCLI(args=["fit", "--config", config])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    # the check is part of the command: it raises (non-zero exit) when the file and eager inference differ
    main(["export", "--ckpt_path", str(ckpt), "--format", "torch.export", "--size", "96", "128", "--out", str(out)])
    report = json.loads((out / "export.json").read_text())
    assert [c["file_name"] for c in report["check"]] == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert all(c["ok"] for c in report["check"])
    assert report["categories"] and report["mask_thr"] == 0.5
    assert (out / "model.pt2").is_file()
    # the Predictor's export is the same command from Python: same graph, same check, same report
    from htc_lightning import Predictor

    report = Predictor(ckpt).export(tmp_path / "from_python", "onnx", size=(96, 128))
    assert report["format"] == "onnx" and report["size"] == [96, 128]
    assert len(report["check"]) == 3 and all(c["ok"] for c in report["check"])
    assert (tmp_path / "from_python" / "model.onnx").is_file()


def test_export_command_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.ckpt does not exist"):
        main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--format", "onnx", "--out", str(tmp_path)])
