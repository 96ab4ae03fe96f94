"""Checkpoints saved before the Detector passed a FeatureSpec to its parts still build and load: the saved
detector config is rewritten (widths and the class count are the Detector's now), the weights are unchanged."""
import json
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from htc_lightning.checkpoints.upgrade import detector_config, upgrade_detector_config
from htc_lightning.models.detector import Detector

FIXTURES = Path(__file__).parent / "fixtures"
OLD = yaml.safe_load((FIXTURES / "detector_config_before_issue27.yaml").read_text())


def build(spec: dict) -> Detector:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Detector, "detector")
    return parser.instantiate(parser.parse_object({"detector": spec})).detector


def test_an_old_detector_config_builds_the_same_modules_after_the_upgrade():
    spec = upgrade_detector_config(OLD)
    assert spec["init_args"]["num_classes"] == 6 and "num_classes" not in spec["init_args"]["roi_head"]["init_args"]
    assert "in_channels" not in json.dumps(spec)
    detector = build(spec)
    shapes = json.loads((FIXTURES / "state_dict_shapes_before_issue27.json").read_text())
    assert {k: list(v.shape) for k, v in detector.state_dict().items()} == shapes
    head = detector.roi_head
    assert head.interleaved and head.mask_info_flow and head.with_semantic and head.num_classes == 6


def test_a_current_config_is_left_as_it_is_and_the_upgrade_is_idempotent():
    once = upgrade_detector_config(OLD)
    assert upgrade_detector_config(once) == once
    current = yaml.safe_load((Path(__file__).parents[1] / "configs/parity/htc_tiny.yaml").read_text())
    assert upgrade_detector_config(current) == current


def test_a_checkpoint_without_a_detector_config_has_none():
    assert detector_config({"lr": 0.02}) is None
    assert detector_config({"detector": OLD})["init_args"]["num_classes"] == 6
