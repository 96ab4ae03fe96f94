"""The ``htc-lightning`` CLI: config printing, the num_classes link, fit and resume, swappable parts."""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import TinyCocoDataModule, fake_cli_config

from htc_lightning.callbacks import DetectionCheckpoint, ResumeState, SigtermCheckpoint
from htc_lightning.cli import HTCLightningCLI, main


def test_num_classes_is_linked_from_the_datamodule_into_the_roi_head(tmp_path):
    cli = HTCLightningCLI(args=["--config", fake_cli_config(tmp_path)], run=False)
    assert isinstance(cli.datamodule, TinyCocoDataModule)
    assert cli.model.detector.roi_head.num_classes == cli.datamodule.num_classes == 2  # not the default 80


def test_default_callbacks_are_installed(tmp_path):
    cli = HTCLightningCLI(args=["--config", fake_cli_config(tmp_path)], run=False)
    kinds = {type(cb) for cb in cli.trainer.callbacks}
    assert {DetectionCheckpoint, ResumeState, SigtermCheckpoint} <= kinds
    checkpoint = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DetectionCheckpoint))
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == ("val/segm_mAP", "max", True)


def test_print_config_shows_the_class_paths(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", fake_cli_config(tmp_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["detector"]["class_path"] == "conftest.FakeDetector"
    assert printed["checkpoint"]["monitor"] == "val/segm_mAP"


def test_fit_saves_last_and_best_and_resumes_with_ckpt_path_last(tmp_path):
    config = fake_cli_config(tmp_path, val_check_interval=2, limit_val_batches=1)
    first = HTCLightningCLI(args=["fit", "--config", config])
    ckpt_dir = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    assert first.trainer.checkpoint_callback.monitor == "val/segm_mAP"
    resumed = HTCLightningCLI(args=["fit", "--config", config, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 5
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 5


def test_box_only_model_keeps_best_checkpoint_by_bbox_map(tmp_path):
    config = fake_cli_config(tmp_path, val_check_interval=2, limit_val_batches=1)
    cli = HTCLightningCLI(args=["fit", "--config", config, "--model.detector.with_mask", "false"])
    assert cli.trainer.checkpoint_callback.monitor == "val/bbox_mAP"
    assert cli.trainer.checkpoint_callback.best_model_path


def test_fit_without_validation_keeps_only_last(tmp_path):
    cli = HTCLightningCLI(args=["fit", "--config", fake_cli_config(tmp_path, limit_val_batches=0)])
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.ckpt"]
    assert cli.trainer.global_step == 3


def test_validate_and_test_subcommands_log_metrics(tmp_path):
    config = fake_cli_config(tmp_path)
    validated = HTCLightningCLI(args=["validate", "--config", config])
    assert "val/bbox_mAP" in validated.trainer.callback_metrics
    tested = HTCLightningCLI(args=["test", "--config", config])
    assert "test/segm_mAP" in tested.trainer.callback_metrics


def test_cluster_config_parses(capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "cluster" / "htc_r50_fpn_1x_coco_ddp.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_nodes"] == 2 and printed["trainer"]["strategy"] == "ddp"
    assert printed["trainer"]["plugins"][0]["init_args"]["auto_requeue"] is True
