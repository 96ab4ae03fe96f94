"""A checkpoint carries its categories: ``predict`` needs only the checkpoint and a folder of images, and an
annotation file with other categories is an error naming both."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_cli_real_htc import tiny_htc_config

from htc_lightning.cli import HTCLightningCLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory, coco_root):
    tmp = tmp_path_factory.mktemp("cats")
    config = tiny_htc_config(tmp, coco_root, max_steps=1, limit_val_batches=0)
    HTCLightningCLI(args=["fit", "--config", config])
    return config, tmp / "run" / "checkpoints" / "last.ckpt"


def test_the_checkpoint_stores_ids_names_and_order(trained, coco_root):
    _, ckpt = trained
    categories = torch.load(ckpt, weights_only=True)["categories"]
    ann = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    assert categories == [{"id": c["id"], "name": c["name"]} for c in sorted(ann["categories"], key=lambda c: c["id"])]


def test_predict_needs_only_the_checkpoint_and_images(trained, coco_root, tmp_path):
    config, ckpt = trained
    shutil.copytree(coco_root / "val2017", tmp_path / "photos")
    shutil.copy(ckpt, tmp_path / "model.ckpt")
    out = tmp_path / "predictions"
    # data_root without any annotation file: the categories (and num_classes) come from the checkpoint
    cli = HTCLightningCLI(args=["predict", "--config", config, "--ckpt_path", str(tmp_path / "model.ckpt"),
                                "--data.init_args.data_root", str(tmp_path), "--data.init_args.predict_images",
                                "photos", "--prediction_writer.output_dir", str(out)])
    assert cli.model.detector.roi_head.num_classes == len(torch.load(ckpt, weights_only=True)["categories"])
    assert any(out.iterdir())


def test_an_annotation_file_with_other_categories_is_an_error_naming_both(trained, coco_root, tmp_path):
    config, ckpt = trained
    shutil.copytree(coco_root, tmp_path / "other", ignore=shutil.ignore_patterns("train2017", "stuffthingmaps"))
    ann_file = tmp_path / "other" / "annotations" / "instances_val2017.json"
    ann = json.loads(ann_file.read_text())
    ann["categories"][0]["name"] = "zebra"
    ann_file.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=r"has categories .*zebra.* but the model \(checkpoint\) was trained for"):
        HTCLightningCLI(args=["test", "--config", config, "--ckpt_path", str(ckpt),
                              "--data.init_args.data_root", str(tmp_path / "other"),
                              "--data.init_args.stuff_maps", "null"])
