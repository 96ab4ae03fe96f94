"""Export of the inference graph (torch.export and ONNX): the tiny HTC, Cascade Mask R-CNN and HTC + GA-RPN
configs exported with random weights, and checked against eager ``predict`` on three real photographs (COCO
val2017, tests/fixtures/export_images) at the traced size and at image sizes other than the traced one; the
``htc-lightning export`` command on a checkpoint written by ``fit``; the export speed benchmark on an exported
file."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from htc_lightning import export
from htc_lightning.cli import main
from htc_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from htc_lightning.tools.mmdet_parity import build_detector

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "tiny"
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
    detector = build_detector(str(CONFIGS / FAMILIES[family]), ["num_classes=4"])
    if family == "htc_ga_rpn":
        spread_location_logits(detector.rpn_head)
    return detector.eval()


def spread_location_logits(rpn) -> None:
    """An untrained GA-RPN's location probabilities all sit at its threshold: mmdet's init gives the location
    branch the prior 0.01 (bias -log 99, weights of std 0.01) and ``loc_filter_thr`` is 0.01, so on the photographs
    every location lies within 1e-4 of it, hundreds within 1e-5, a few within 1e-8, where onnxruntime's sigmoid
    and conv rounding decide the filter otherwise than ATen's (issue 29: one location flipped, 5.7e-9 below the
    threshold, gave a proposal eager has not and 5 unexplained detections). A trained location branch spreads its
    logits; so does this seeded one (std 1: part of the locations kept, part dropped), and the test checks that no
    location is within ``export.LOC_NEAR_TIE`` of the threshold (with this seed the nearest is 1.7e-4 away over the
    photographs at the three sizes; seed 1 had one at 2.9e-8 once the model's initialisation order changed)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        rpn.conv_loc.weight.copy_(torch.randn(rpn.conv_loc.weight.shape, generator=generator))
        rpn.conv_loc.bias.fill_(math.log(rpn.loc_filter_thr / (1 - rpn.loc_filter_thr)) + 0.5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(family, fmt)`` -> (detector, file): each family traced once, at ``TRACED``; its program written
    as ``model.pt2`` at once and converted to ONNX when a test first asks (the conversion is the slow part)."""
    programs, files = {}, {}

    def get(family: str, fmt: str):
        if family not in programs:
            detector = tiny_detector(family)
            program = export.trace(detector, TRACED)
            out = tmp_path_factory.mktemp(family)
            files[family, "torch.export"] = export.save(detector, "torch.export", out, TRACED, program)
            programs[family] = (detector, program, out)
        detector, program, out = programs[family]
        if (family, fmt) not in files:
            files[family, fmt] = export.save(detector, fmt, out, TRACED, program)
        return detector, files[family, fmt]

    return get


def test_an_untrained_ga_rpn_decides_its_location_filter_at_rounding_and_the_spread_one_does_not():
    # why the GA-RPN family's test model spreads its location logits (issue 29's onnxruntime mismatch)
    torch.manual_seed(0)
    untrained = build_detector(str(CONFIGS / FAMILIES["htc_ga_rpn"]), ["num_classes=4"]).eval()
    spread = tiny_detector("htc_ga_rpn")
    photos = sorted(PHOTOS.glob("*.jpg"))
    samples = export.load_images(photos[:2], OTHER[0], IMAGENET_MEAN, IMAGENET_STD)
    margins = [export.location_filter_margin(untrained, images) for images, _ in samples]
    assert min(margins) <= export.LOC_NEAR_TIE, margins
    assert all(export.location_filter_margin(spread, images) > export.LOC_NEAR_TIE for images, _ in samples)
    assert export.location_filter_margin(tiny_detector("htc"), samples[0][0]) is None  # no location filter


def assert_checked(checks):
    assert len(checks) == 3
    for c in checks:
        assert c.ok, str(c)
        assert c.eager > 0 and c.matched > 0.9 * c.eager, str(c)  # not a vacuous check: detections were compared
        # GA-RPN: no location decided at its threshold's rounding, where the exported filter may differ unseen
        assert c.loc_margin is None or c.loc_margin > export.LOC_NEAR_TIE, str(c)


@pytest.mark.parametrize("fmt", ["torch.export", pytest.param("onnx", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_tiny_model_matches_eager_inference_on_photographs(exported, family, fmt):
    detector, path = exported(family, fmt)
    assert path.name == export.FILE_NAMES[fmt] and path.is_file()
    runner = export.Runner(path)
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert_checked(export.check(detector, runner, export.load_images(photos, TRACED, IMAGENET_MEAN, IMAGENET_STD)))
    # dynamic image size: the same file at other sizes than the one it was traced at
    samples = (export.load_images(photos[:2], OTHER[0], IMAGENET_MEAN, IMAGENET_STD)
               + export.load_images(photos[2:], OTHER[1], IMAGENET_MEAN, IMAGENET_STD))
    sizes = {tuple(images.shape[-2:]) for images, _ in samples}
    assert export.padded(TRACED) not in sizes and len(sizes) == 2
    assert_checked(export.check(detector, runner, samples))


@pytest.mark.slow
def test_export_speed_times_onnxruntime_and_eager_on_the_same_work(exported, capsys):
    # the benchmark builds the same detector (config, 4 classes, seed 0) and times the file the tests exported;
    # it checks that file against its own eager inference first
    _, path = exported("htc", "onnx")
    spec = importlib.util.spec_from_file_location("export_speed", ROOT / "benchmarks" / "export_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--config", str(CONFIGS / FAMILIES["htc"]), "--height", "96", "--width", "128",
                           "--num-classes", "4", "--runs", "1", "--warmup", "0", "--threads", "1", "--formats",
                           "onnx", "--exported", str(path.parent)])
    finally:
        torch.set_num_threads(threads)
    assert set(rows) == {"eager (ours)", "onnxruntime CPU"}
    assert all(r["seconds"] > 0 for r in rows.values())
    assert rows["eager (ours)"]["detections"] == rows["onnxruntime CPU"]["detections"] == 100  # the same work
    assert "-> ok" in capsys.readouterr().out  # the file was this detector


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

    # (torch.export: the ONNX conversion, a minute, is tested on the families' files above)
    report = Predictor(ckpt).export(tmp_path / "from_python", "torch.export", size=(96, 128))
    assert report["format"] == "torch.export" and report["size"] == [96, 128]
    assert len(report["check"]) == 3 and all(c["ok"] for c in report["check"])
    assert (tmp_path / "from_python" / "model.pt2").is_file()


def test_export_command_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.ckpt does not exist"):
        main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--format", "onnx", "--out", str(tmp_path)])
