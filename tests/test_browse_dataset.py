"""``python -m htc_lightning.tools.browse_dataset``: the ground truth drawn on the image files, or on the batches
the model receives (resized, flipped, padded), built by the config's own datamodule."""
from __future__ import annotations

import json

import numpy as np
import yaml
from _real28 import COCO_TINY_28, real_htc_config
from PIL import Image
from pycocotools.coco import COCO
from test_cli_real_htc import tiny_htc_config

from htc_lightning.tools.browse_dataset import browse, main


def test_real_photographs_are_drawn_in_their_own_frame_with_their_objects(tmp_path):
    config = real_htc_config(tmp_path)
    main(["--config", config, "--out", str(tmp_path / "raw"), "--num", "4"])
    gt = COCO(str(COCO_TINY_28 / "annotations" / "instances_val2017.json"))
    for info in gt.loadImgs(gt.getImgIds()):
        drawn = np.asarray(Image.open(tmp_path / "raw" / (info["file_name"][:-4] + ".png")))
        original = np.asarray(Image.open(COCO_TINY_28 / "val2017" / info["file_name"]).convert("RGB"))
        assert drawn.shape == original.shape
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=info["id"])):
            inside = gt.annToMask(ann).astype(bool)
            # every object's mask is tinted
            assert np.abs(drawn[inside].astype(int) - original[inside].astype(int)).mean() > 5


def test_after_transforms_draws_the_padded_batches_of_the_training_loader(tmp_path, coco_root):
    config = tiny_htc_config(tmp_path, coco_root)
    written = browse(config, str(tmp_path / "batches"), num=3, after_transforms=True)
    assert len(written) == 3
    data = yaml.safe_load(open(config))["data"]["init_args"]
    for path in written:
        picture = Image.open(path)
        # the training scale is 64x64 and the padding a multiple of 32: what the network is given, plus a title row
        assert picture.size == (64, 64 + 14)
    assert data["stuff_maps"] == "stuffthingmaps"  # the semantic map is loaded: it is drawn as an overlay


def test_another_epoch_draws_other_augmentations(tmp_path, coco_root):
    config = tiny_htc_config(tmp_path, coco_root)
    first = [np.asarray(Image.open(p)) for p in browse(config, str(tmp_path / "e0"), 4, True, epoch=0)]
    again = [np.asarray(Image.open(p)) for p in browse(config, str(tmp_path / "e0b"), 4, True, epoch=0)]
    other = [np.asarray(Image.open(p)) for p in browse(config, str(tmp_path / "e1"), 4, True, epoch=1)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # the same seed draws the same batches
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_a_config_without_data_section_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"model": {}}))
    try:
        browse(str(path), str(tmp_path / "o"))
    except ValueError as e:
        assert "has no 'data" in str(e)
    else:
        raise AssertionError("expected a ValueError")
