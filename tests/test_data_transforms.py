"""Resize / flip / normalise / pad: sizes as mmcv, and boxes, masks and semantic maps kept aligned."""
import pytest
import torch
from torchvision.ops import masks_to_boxes

from htc_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionCollate,
    DetectionTransform,
    rescale_size,
    sample_train_scale,
)


def _sample(height=60, width=90):
    """A textured image with three rectangles (masks, boxes, labels) and a matching semantic map."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    rects = [(5, 7, 30, 40), (41, 3, 88, 22), (60, 30, 75, 59)]  # x0, y0, x1, y1 (exclusive)
    masks = torch.zeros(len(rects), height, width, dtype=torch.uint8)
    semantic = torch.full((height, width), 200, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = 1
        semantic[y0:y1, x0:x1] = 10 * (i + 1)
    target = {"boxes": torch.tensor(rects, dtype=torch.float32), "labels": torch.tensor([0, 1, 2]),
              "masks": masks, "semantic": semantic, "crowd_boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
              "meta": {"image_id": 5, "file_name": "x.jpg", "orig_size": (height, width)}}
    return image, target


def _mask_boxes(masks):
    return masks_to_boxes(masks.bool()) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel extents, xyxy exclusive


def _assert_aligned(target, tol=1.0):
    assert torch.allclose(_mask_boxes(target["masks"]), target["boxes"], atol=tol)
    for i, mask in enumerate(target["masks"].bool()):
        assert (target["semantic"][mask] == 10 * (i + 1)).all()


@pytest.mark.parametrize(("hw", "scale", "expected_hw"), [
    # expected values from mmcv.rescale_size (mmcv 2.x, the oracle venv)
    ((480, 640), (1333, 800), (800, 1067)),
    ((427, 640), (1333, 800), (800, 1199)),
    ((640, 427), (1333, 800), (1199, 800)),
    ((333, 500), (1600, 400), (400, 601)),
    ((100, 3000), (1333, 800), (44, 1333)),
    ((77, 91), (1333, 800), (800, 945)),
])
def test_rescale_size_matches_mmcv(hw, scale, expected_hw):
    assert rescale_size(*hw, scale) == expected_hw
    assert rescale_size(*hw, scale[::-1]) == expected_hw  # (long, short) order does not matter


def test_resize_keeps_boxes_masks_and_semantic_aligned():
    image, target = _sample()
    out_image, out = DetectionTransform([(200, 150)], flip_prob=0.0)(image, target)
    assert out_image.shape == (3, 133, 200)
    assert out["meta"]["img_size"] == (133, 200) and out["meta"]["flip"] is False
    assert out["meta"]["scale_factor"] == pytest.approx((200 / 90, 133 / 60))
    assert out["masks"].shape == (3, 133, 200) and out["semantic"].shape == (133, 200)
    torch.testing.assert_close(out["boxes"], target["boxes"] * torch.tensor([200 / 90, 133 / 60] * 2))
    _assert_aligned(out)


def test_flip_mirrors_boxes_in_float_and_keeps_alignment():
    image, target = _sample()
    _, plain = DetectionTransform([(200, 150)], flip_prob=0.0)(image, target)
    _, flipped = DetectionTransform([(200, 150)], flip_prob=1.0)(image, target)
    assert flipped["meta"]["flip"] is True
    width = 200
    expected = torch.stack([width - plain["boxes"][:, 2], plain["boxes"][:, 1], width - plain["boxes"][:, 0],
                            plain["boxes"][:, 3]], 1)
    torch.testing.assert_close(flipped["boxes"], expected)
    torch.testing.assert_close(flipped["crowd_boxes"][:, 0], width - plain["crowd_boxes"][:, 2])
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    _assert_aligned(flipped)


def test_downscale_keeps_alignment_within_a_pixel():
    image, target = _sample()
    _, out = DetectionTransform([(50, 40)], flip_prob=1.0)(image, target)
    assert out["masks"].shape[-2:] == (33, 50)
    _assert_aligned(out)


def test_images_are_normalised_with_mean_and_std():
    image = torch.full((3, 10, 10), 100, dtype=torch.uint8)
    out, _ = DetectionTransform([(10, 10)], mean=(100.0, 50.0, 0.0), std=(1.0, 10.0, 50.0))(image, {"meta": {}})
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.0, 5.0, 2.0]))


def test_normalisation_is_bit_equal_to_mmengines_division_at_every_grey_level():
    # mmengine's data preprocessor computes (x - mean) / std in float32; x * (1 / std) differs by 1 ulp at 28 %
    image = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256).contiguous()
    out, _ = DetectionTransform([(256, 1)], flip_prob=0.0)(image, {"meta": {}})
    expected = (image.float() - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(out, expected)


def test_collate_pads_to_the_divisor_with_the_right_fill():
    a = DetectionTransform([(90, 60)], flip_prob=0.0)(*_sample())
    b = DetectionTransform([(45, 30)], flip_prob=0.0)(*_sample())
    images, targets = DetectionCollate(32)([a, b])
    assert images.shape == (2, 3, 64, 96)
    for i, ((img, _), padded) in enumerate(zip((a, b), targets)):
        h, w = img.shape[-2:]
        assert padded["meta"]["pad_size"] == (64, 96) and padded["meta"]["img_size"] == (h, w)
        assert padded["masks"].shape == (3, 64, 96) and padded["masks"].dtype == torch.uint8
        assert padded["semantic"].shape == (64, 96) and padded["semantic"].dtype == torch.int64
        assert torch.equal(images[i, :, :h, :w], img)
        assert (images[i, :, h:] == 0).all() and (images[i, :, :, w:] == 0).all()
        assert (padded["semantic"][h:] == 255).all() and (padded["semantic"][:, w:] == 255).all()
        assert padded["masks"][:, h:].sum() == 0 and padded["masks"][:, :, w:].sum() == 0
        _assert_aligned(padded)


def test_multiscale_range_stays_in_bounds_and_spreads():
    g = torch.Generator().manual_seed(0)
    shorts = []
    for _ in range(500):
        long_edge, short_edge = sample_train_scale([(1333, 800)], (400, 1400), 1600, generator=g)
        assert long_edge == 1600 and 400 <= short_edge <= 1400
        new_h, new_w = rescale_size(480, 640, (long_edge, short_edge))
        assert min(new_h, new_w) <= short_edge and max(new_h, new_w) <= 1600
        shorts.append(short_edge)
    assert min(shorts) < 450 and max(shorts) > 1350


def test_scale_list_picks_each_listed_scale_only():
    g = torch.Generator().manual_seed(0)
    scales = [(1333, 640), (1333, 800), (1333, 960)]
    picked = {sample_train_scale(scales, generator=g) for _ in range(100)}
    assert picked == set(scales)


def test_short_range_overrides_the_scale_list_in_the_transform():
    torch.manual_seed(0)
    t = DetectionTransform([(20, 10)], short_range=(30, 40), max_long=1000)
    for _ in range(10):
        out, _ = t(torch.zeros(3, 20, 30, dtype=torch.uint8), {"meta": {}})
        assert 30 <= out.shape[-2] <= 40


def test_an_image_without_annotations_keeps_empty_shapes():
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 30, 40, dtype=torch.uint8), "crowd_boxes": torch.zeros(0, 4), "meta": {}}
    sample = DetectionTransform([(100, 60)], flip_prob=1.0)(torch.zeros(3, 30, 40, dtype=torch.uint8), target)
    images, (out,) = DetectionCollate(32)([sample])
    assert images.shape == (1, 3, 64, 96)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["masks"].shape == (0, 64, 96)
