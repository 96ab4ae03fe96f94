"""``--model.init_args.load_from``: an mmdetection checkpoint initialises the detector through the CLI; layers
sized by the class count are re-initialised for a dataset with other classes and reported."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from htc_lightning.checkpoints.mmdet import convert_mmdet_state_dict
from htc_lightning.cli import HTCLightningCLI

ROOT = Path(__file__).resolve().parents[1]
# the oracle dump supplies mmdet-format weights (a fixture made elsewhere, hence the marker)
pytestmark = pytest.mark.reference
ORACLE = ROOT / "tests" / "fixtures" / "oracle" / "tiny_htc_s0.pt"
CLASS_LAYERS = {f"roi_head.{head}.{stage}.{layer}.{p}" for stage in range(3) for p in ("weight", "bias")
                for head, layer in (("bbox_head", "fc_cls"), ("mask_head", "conv_logits"))}


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    """The oracle's tiny HTC (80 COCO classes) saved as a model-zoo file: ``{"meta": ..., "state_dict": ...}``."""
    dump = torch.load(ORACLE, weights_only=False)
    path = tmp_path_factory.mktemp("zoo") / "htc_tiny_coco.pth"
    torch.save({"meta": {"epoch": 12, "mmdet_version": "3.3.0"}, "state_dict": dump["state_dict"]}, path)
    return path, dump["state_dict"]


def _config(tmp_path: Path, coco_root: Path) -> str:
    detector = yaml.safe_load((ROOT / "configs" / "parity" / "htc_tiny.yaml").read_text())
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
                    "default_root_dir": str(tmp_path / "run")},
        # lr 0: the one optimiser step leaves every weight where the checkpoint put it
        "model": {"class_path": "htc_lightning.module.DetectionModule",
                  "init_args": {"lr": 0.0, "log_images": 0, "detector": detector}},
        "data": {"class_path": "htc_lightning.data.datamodule.CocoDataModule",
                 "init_args": {"data_root": str(coco_root), "stuff_maps": "stuffthingmaps",
                               "train_scales": [[64, 64]], "test_scale": [64, 64], "batch_size": 1,
                               "num_workers": 0}},
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fit_loads_an_mmdet_checkpoint_and_reinitialises_the_class_layers(tmp_path, coco_root, zoo_file, caplog):
    caplog.set_level(logging.INFO)  # the report is Lightning's rank-zero info log
    path, state_dict = zoo_file
    cli = HTCLightningCLI(args=["fit", "--config", _config(tmp_path, coco_root),
                                "--model.init_args.load_from", str(path)])
    num_classes = cli.datamodule.num_classes
    report = cli.model.load_report
    assert cli.trainer.global_step == 1
    assert set(report.reinitialised) == CLASS_LAYERS and not report.mismatched
    printed = caplog.text
    assert f"re-initialised for {num_classes} classes (checkpoint: 80): " in printed
    assert all(key in printed for key in CLASS_LAYERS)
    theirs = convert_mmdet_state_dict(state_dict)
    ours = cli.model.detector.state_dict()
    compatible = [k for k in theirs if k in ours and k not in CLASS_LAYERS]
    assert len(compatible) == report.loaded and len(compatible) > 100
    assert [k for k in compatible if not torch.equal(ours[k], theirs[k].to(ours[k].dtype))] == []
    assert ours["roi_head.bbox_head.0.fc_cls.weight"].shape[0] == num_classes + 1


def test_evaluating_a_checkpoint_with_another_class_count_is_an_error(tmp_path, coco_root, zoo_file):
    path, _ = zoo_file
    with pytest.raises(ValueError, match=r"trained for 80 classes but the data has \d+"):
        HTCLightningCLI(args=["validate", "--config", _config(tmp_path, coco_root),
                              "--model.init_args.load_from", str(path)])


def test_a_resumed_runs_ckpt_path_wins_over_load_from(tmp_path, coco_root, zoo_file, caplog):
    caplog.set_level(logging.INFO)
    path, _ = zoo_file
    config = _config(tmp_path, coco_root)
    HTCLightningCLI(args=["fit", "--config", config, "--model.init_args.load_from", str(path)])
    resumed = HTCLightningCLI(args=["fit", "--config", config, "--model.init_args.load_from", str(path),
                                    "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 2 and resumed.model.load_report is None
    assert "skipped: the weights come from ckpt_path" in caplog.text
