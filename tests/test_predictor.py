"""``Predictor``: a checkpoint alone detects on a file, a PIL image, an array, a tensor, a list or a folder,
in the original frame with class names; it runs what ``htc-lightning predict`` runs; zoo files need a config."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _real28 import COCO_TINY_28, real_htc_config
from PIL import Image
from test_cli_real_htc import tiny_htc_config

from htc_lightning import Predictor
from htc_lightning.cli import HTCLightningCLI


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory, coco_root):
    tmp = tmp_path_factory.mktemp("pred")
    config = tiny_htc_config(tmp, coco_root, max_steps=2, limit_val_batches=0)
    HTCLightningCLI(args=["fit", "--config", config])
    return config, tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred_real")
    config = real_htc_config(tmp, max_steps=2, limit_val_batches=0)
    HTCLightningCLI(args=["fit", "--config", config])
    return config, tmp / "run" / "checkpoints" / "last.ckpt"


def _same(a, b) -> None:
    assert torch.equal(a.labels, b.labels) and a.names == b.names
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(a.scores, b.scores)


def test_a_checkpoint_alone_detects_with_class_names_in_the_original_frame(synthetic_ckpt, coco_root, tmp_path):
    _, ckpt = synthetic_ckpt
    moved = tmp_path / "model.ckpt"  # no config, no annotation file next to it
    moved.write_bytes(ckpt.read_bytes())
    files = sorted((coco_root / "val2017").glob("*.jpg"))
    result = Predictor(moved)(files[0])
    names = [c["name"] for c in json.loads((coco_root / "annotations/instances_val2017.json").read_text())
             ["categories"]]
    assert len(result) > 0 and set(result.names) <= set(names)
    assert result.names == [names[i] for i in result.labels.tolist()]
    h, w = Image.open(files[0]).size[::-1]
    assert result.image_size == (h, w) and result.masks.shape[-2:] == (h, w)
    assert float(result.boxes[:, 2].max()) <= w + 1e-3 and float(result.boxes[:, 3].max()) <= h + 1e-3


def test_every_input_kind_gives_the_same_detections(synthetic_ckpt, coco_root):
    predictor = Predictor(synthetic_ckpt[1])
    file = sorted((coco_root / "val2017").glob("*.jpg"))[0]
    reference = predictor(file)
    pil = Image.open(file)
    array = np.array(pil.convert("RGB"))
    for other in (predictor(str(file)), predictor(pil), predictor(array),
                  predictor(torch.from_numpy(array).permute(2, 0, 1)),  # uint8 (3, H, W)
                  predictor(torch.from_numpy(array).permute(2, 0, 1).float() / 255)):  # float 0..1
        _same(other, reference)
    assert isinstance(predictor([file]), list) and len(predictor([file, pil])) == 2


def test_a_batch_gives_what_single_images_give(synthetic_ckpt, coco_root):
    files = sorted((coco_root / "val2017").glob("*.jpg"))
    one_by_one = [Predictor(synthetic_ckpt[1])(f) for f in files]
    batched = Predictor(synthetic_ckpt[1], batch_size=2)(coco_root / "val2017")  # a folder: every image in it
    assert [r.source for r in batched] == [str(f) for f in files]
    for a, b in zip(batched, one_by_one):
        _same(a, b)


def test_predictor_and_cli_predict_write_the_same_detections(synthetic_ckpt, coco_root, tmp_path):
    config, ckpt = synthetic_ckpt
    out = tmp_path / "cli"
    HTCLightningCLI(args=["predict", "--config", config, "--ckpt_path", str(ckpt),
                          "--prediction_writer.output_dir", str(out)])
    cli = json.loads((out / "predictions.bbox.json").read_text())
    images = {im["id"]: im["file_name"] for im in json.loads((out / "images.json").read_text())}
    results = {r.source.rsplit("/", 1)[-1]: r for r in Predictor(ckpt)(coco_root / "val2017")}
    assert set(images.values()) == set(results)
    for image_id, name in images.items():
        theirs = [d for d in cli if d["image_id"] == image_id]
        ours = results[name]
        assert [d["category_id"] for d in theirs] == ours.category_ids
        np.testing.assert_allclose([d["score"] for d in theirs], ours.scores.numpy(), rtol=1e-6)
        xywh = ours.boxes.double().clone()
        xywh[:, 2:] -= xywh[:, :2]
        np.testing.assert_allclose([d["bbox"] for d in theirs], xywh.numpy(), rtol=1e-6, atol=1e-4)


def test_draw_returns_the_picture_with_the_detections_on_it(synthetic_ckpt, coco_root):
    predictor = Predictor(synthetic_ckpt[1])
    file = sorted((coco_root / "val2017").glob("*.jpg"))[0]
    original = Image.open(file).convert("RGB")
    drawn = predictor.draw(file, score_thr=0.0)
    assert drawn.size == original.size
    assert not np.array_equal(np.asarray(drawn), np.asarray(original))
    nothing = predictor.draw(file, score_thr=2.0)  # no detection scores 2: the picture is unchanged
    assert np.array_equal(np.asarray(nothing), np.asarray(original))


def test_bf16_autocast_runs_and_returns_fp32_detections(synthetic_ckpt, coco_root):
    result = Predictor(synthetic_ckpt[1], precision="bf16-mixed")(sorted((coco_root / "val2017").glob("*.jpg"))[0])
    assert result.boxes.dtype == torch.float32 and result.scores.dtype == torch.float32


def test_a_zoo_style_weights_file_with_its_config_predicts_as_the_checkpoint(synthetic_ckpt, coco_root, tmp_path):
    config, ckpt = synthetic_ckpt
    checkpoint = torch.load(ckpt, weights_only=True)
    weights = {k.removeprefix("detector."): v for k, v in checkpoint["state_dict"].items()}
    zoo = tmp_path / "zoo.pth"
    torch.save({"state_dict": weights, "meta": {}}, zoo)  # mmdet's layout: no hyper-parameters, no categories
    file = sorted((coco_root / "val2017").glob("*.jpg"))[0]
    from_zoo = Predictor(zoo, config=config, categories=checkpoint["categories"])(file)
    _same(from_zoo, Predictor(ckpt)(file))


def test_a_weights_file_without_config_is_an_error_saying_to_pass_one(synthetic_ckpt, tmp_path):
    zoo = tmp_path / "zoo.pth"
    torch.save({"state_dict": {}}, zoo)
    with pytest.raises(ValueError, match="pass the config it was trained with"):
        Predictor(zoo)


def test_a_zoo_file_with_another_class_count_than_the_categories_is_refused(synthetic_ckpt, tmp_path):
    config, ckpt = synthetic_ckpt
    weights = {k.removeprefix("detector."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    torch.save(weights, tmp_path / "zoo.pth")
    # default categories: COCO's 80, but the file's classifier has 6 classes
    with pytest.raises(ValueError, match="trained for 6 classes"):
        Predictor(tmp_path / "zoo.pth", config=config)


def test_unknown_inputs_name_what_is_accepted(synthetic_ckpt):
    predictor = Predictor(synthetic_ckpt[1])
    with pytest.raises(TypeError, match="a file path, a folder, a PIL image"):
        predictor(3.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predictor("no_such_photo.jpg")
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        predictor(torch.full((3, 8, 8), 200.0))


def test_real_photographs_get_coco_names_in_their_own_frame(real_ckpt):
    _, ckpt = real_ckpt
    files = sorted((COCO_TINY_28 / "val2017").glob("*.jpg"))
    predictor = Predictor(ckpt, batch_size=2)
    results = predictor(files)
    coco = {c["name"] for c in json.loads((COCO_TINY_28 / "annotations/instances_val2017.json").read_text())
            ["categories"]}
    for file, result in zip(files, results):
        w, h = Image.open(file).size
        assert result.image_size == (h, w)
        assert set(result.names) <= coco
        if len(result):
            assert result.masks.shape[-2:] == (h, w)
            assert float(result.boxes[:, 0::2].max()) <= w + 1e-3 and float(result.boxes[:, 1::2].max()) <= h + 1e-3
    assert predictor.draw(files[0], results[0], score_thr=0.0).size == Image.open(files[0]).size
