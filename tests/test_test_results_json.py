"""``test`` writes COCO results (bbox + segm, original category ids) into the run's log directory by default,
and prints where; ``outfile_prefix`` still chooses the place."""
import json
import logging

from conftest import fake_cli_config

from htc_lightning.cli import HTCLightningCLI


def test_test_writes_coco_json_into_the_log_dir_and_prints_the_paths(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # Lightning's rank-zero info log
    config = fake_cli_config(tmp_path)
    HTCLightningCLI(args=["test", "--config", config])
    run = tmp_path / "run"
    bbox, segm = run / "results.test.bbox.json", run / "results.test.segm.json"
    assert f"COCO results written: {bbox}, {segm}" in caplog.text
    detections = json.loads(bbox.read_text())
    assert detections and {d["category_id"] for d in detections} <= {1, 3}  # the data's ids, not labels 0/1
    assert all(isinstance(d["segmentation"]["counts"], str) for d in json.loads(segm.read_text()))


def test_outfile_prefix_overrides_the_default_place(tmp_path):
    config = fake_cli_config(tmp_path)
    HTCLightningCLI(args=["test", "--config", config, "--model.init_args.outfile_prefix", str(tmp_path / "mine")])
    assert (tmp_path / "mine.test.bbox.json").is_file()
    assert not (tmp_path / "run" / "results.test.bbox.json").exists()
