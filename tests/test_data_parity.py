"""Parity with mmdetection 3.3.0's training pipeline (LoadImageFromFile, LoadAnnotations, Resize keep_ratio,
RandomFlip, DetDataPreprocessor) on the images stored in the fixture.

The fixture comes from ``tests/fixtures/data/dump_mmdet_pipeline.py`` run in the oracle venv; it holds
the input files (lossless PNG, so decoding is identical) and mmdet's outputs at an up- and a down-scale.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from htc_lightning.data.coco import CocoDetection
from htc_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DetectionCollate, DetectionTransform

pytestmark = pytest.mark.reference
FIXTURE = Path(__file__).parent / "fixtures" / "data" / "mmdet_pipeline.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = torch.load(FIXTURE, weights_only=False)
    root = tmp_path_factory.mktemp("parity")
    for rel, data in ref["files"].items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, ref["cases"]


def _ours(root, scale):
    transform = DetectionTransform([scale], flip_prob=1.0)
    ds = CocoDetection(root / "annotations/instances_train2017.json", root / "train2017", transform,
                       stuff_dir=root / "stuffthingmaps/train2017", train=True)
    samples = [ds[i] for i in range(len(ds))]
    return samples, DetectionCollate(32)(samples)


@pytest.mark.parametrize("scale", [(150, 80), (30, 20)])
def test_boxes_masks_semantic_and_sizes_match_mmdet(reference, scale):
    root, cases = reference
    _, (images, targets) = _ours(root, scale)
    for ref, ours in zip(cases[scale], targets):
        meta = ours["meta"]
        assert meta["image_id"] == ref["img_id"] and meta["flip"] is ref["flip"] is True
        assert meta["img_size"] == tuple(ref["img_shape"])
        assert meta["pad_size"] == tuple(ref["batch_input_shape"]) == ref["inputs_padded_shape"]
        assert meta["scale_factor"] == pytest.approx(tuple(ref["scale_factor"]))
        torch.testing.assert_close(ours["boxes"], ref["boxes"].float(), atol=1e-4, rtol=0)
        torch.testing.assert_close(ours["crowd_boxes"], ref["ignored_boxes"].float().reshape(-1, 4), atol=1e-4, rtol=0)
        assert torch.equal(ours["labels"], ref["labels"])
        h, w = ref["img_shape"]
        ref_masks = np.unpackbits(ref["masks_packed"])[: int(np.prod(ref["masks_shape"]))].reshape(ref["masks_shape"])
        assert np.array_equal(ours["masks"][:, :h, :w].numpy(), ref_masks)
        assert torch.equal(ours["semantic"][:h, :w], ref["semantic"].long())


@pytest.mark.parametrize("scale", [(150, 80), (30, 20)])
def test_images_match_mmdet_within_one_grey_level(reference, scale):
    root, cases = reference
    _, (images, targets) = _ours(root, scale)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, ref in enumerate(cases[scale]):
        h, w = ref["img_shape"]
        expected = (ref["image"].float() - mean) / std
        # cv2's fixed-point bilinear and torch's uint8 bilinear may round a pixel differently
        assert (images[i, :, :h, :w] - expected).abs().max() <= 1.01 / min(IMAGENET_STD)
        assert (images[i, :, h:] == 0).all() and (images[i, :, :, w:] == 0).all()
