import math
from pathlib import Path

import pytest
import torch
from torchvision.ops import roi_align

from htc_lightning.models.layers.masks import mask_targets, paste_masks
from htc_lightning.tools.compare import assert_close_to_reference, threshold_flips

FIXTURE = Path(__file__).parent / "fixtures" / "layers" / "mmdet_layers.pt"


@pytest.fixture(scope="module")
def mmdet_fixture():
    return torch.load(FIXTURE, weights_only=False)


def _rectangles(num: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num, h, w, dtype=torch.uint8)
    boxes = torch.zeros(num, 4)
    for i in range(num):
        x0 = int(torch.randint(0, w // 2, (1,), generator=gen))
        y0 = int(torch.randint(0, h // 2, (1,), generator=gen))
        x1 = x0 + int(torch.randint(2, w // 2, (1,), generator=gen))
        y1 = y0 + int(torch.randint(2, h // 2, (1,), generator=gen))
        masks[i, y0:y1, x0:x1] = 1
        boxes[i] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    return masks, boxes


def test_box_equal_to_rectangle_gives_all_ones():
    gt = torch.zeros(2, 60, 100, dtype=torch.uint8)
    gt[1, 10:50, 20:80] = 1
    targets = mask_targets(torch.tensor([[20.0, 10.0, 80.0, 50.0]]), torch.tensor([1]), gt)
    assert targets.shape == (1, 28, 28) and targets.dtype == torch.float32
    assert bool((targets == 1).all())


def test_box_half_outside_the_object_gives_half_ones():
    gt = torch.zeros(1, 60, 100, dtype=torch.uint8)
    gt[0, 10:50, 20:48] = 1
    targets = mask_targets(torch.tensor([[20.0, 10.0, 76.0, 50.0]]), torch.tensor([0]), gt, mask_size=14)
    assert bool((targets[0, :, :7] == 1).all()) and bool((targets[0, :, 7:] == 0).all())


def test_boxes_are_clipped_to_the_mask_canvas():
    gt = (torch.rand(1, 40, 50, generator=torch.Generator().manual_seed(0)) > 0.5).to(torch.uint8)
    outside = mask_targets(torch.tensor([[-10.0, 5.0, 70.0, 60.0]]), torch.tensor([0]), gt)
    clipped = mask_targets(torch.tensor([[0.0, 5.0, 50.0, 40.0]]), torch.tensor([0]), gt)
    assert torch.equal(outside, clipped)


def test_each_positive_uses_its_assigned_gt_across_gt_chunks():
    masks, boxes = _rectangles(20, 64, 80)
    order = torch.tensor([19, 0, 3, 17, 3, 8, 16, 1])
    jitter = torch.tensor([1.5, -2.0, 0.5, 3.0])
    pos_boxes = boxes[order] + jitter
    targets = mask_targets(pos_boxes, order, masks, mask_size=16)
    # mmdet's formulation: one full-size float mask per positive, RoIAlign with the positive's own batch index
    clipped = pos_boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, 80)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, 64)
    rois = torch.cat([torch.arange(len(order)).float()[:, None], clipped], 1)
    expected = roi_align(masks[order].float()[:, None], rois, (16, 16), 1.0, 0, True)[:, 0] >= 0.5
    assert torch.equal(targets, expected.float())


def test_no_positives_give_empty_targets():
    targets = mask_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(2, 8, 8, dtype=torch.uint8))
    assert targets.shape == (0, 28, 28)


@pytest.mark.reference
def test_mask_targets_match_mmdet(mmdet_fixture):
    ref = mmdet_fixture["mask_targets"]
    assert torch.equal(mask_targets(ref["pos_boxes"], ref["pos_inds"], ref["gt_masks"]), ref["targets"])


def _paste_reference(mask: torch.Tensor, box: list[float], img_h: int, img_w: int) -> torch.Tensor:
    """Per-pixel bilinear sampling (zero outside the mask) of the pixel centre mapped into the box, inside the
    box grown to whole pixels plus one (mmdet's CPU pasting window)."""
    size_h, size_w = mask.shape
    x0, y0, x1, y1 = box
    out = torch.zeros(img_h, img_w)

    def at(r: int, c: int) -> float:
        return float(mask[r, c]) if 0 <= r < size_h and 0 <= c < size_w else 0.0

    for y in range(max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, img_h)):
        for x in range(max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, img_w)):
            u = (x + 0.5 - x0) / (x1 - x0) * size_w - 0.5
            v = (y + 0.5 - y0) / (y1 - y0) * size_h - 0.5
            c, r = math.floor(u), math.floor(v)
            fu, fv = u - c, v - r
            out[y, x] = ((1 - fv) * ((1 - fu) * at(r, c) + fu * at(r, c + 1))
                         + fv * ((1 - fu) * at(r + 1, c) + fu * at(r + 1, c + 1)))
    return out


def test_paste_matches_bruteforce_bilinear_reference():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 6, 6, generator=gen)
    boxes = torch.tensor([[2.3, 1.7, 15.2, 12.9], [10.0, 4.0, 22.5, 19.0], [-3.0, 8.2, 6.4, 26.0]])
    soft = paste_masks(masks, boxes, 24, 20, threshold=-1.0)
    assert soft.dtype == torch.float32
    for i in range(3):
        assert torch.allclose(soft[i], _paste_reference(masks[i], boxes[i].tolist(), 24, 20), atol=1e-5)


def test_paste_thresholds_at_or_above():
    masks = torch.full((1, 4, 4), 0.5)
    pasted = paste_masks(masks, torch.tensor([[4.0, 4.0, 12.0, 12.0]]), 16, 16, threshold=0.5)
    assert pasted.dtype == torch.bool
    assert bool(pasted[0, 5:11, 5:11].all()) and not bool(pasted[0, :3].any())


def test_paste_chunking_does_not_change_the_result():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(9, 28, 28, generator=gen)
    xy = torch.rand(9, 2, generator=gen) * 60
    boxes = torch.cat([xy, xy + torch.rand(9, 2, generator=gen) * 40 + 1], 1)
    one_chunk = paste_masks(masks, boxes, 80, 90, threshold=-1.0, chunk_size=100)
    for chunk_size in (1, 2, 4):
        assert torch.equal(paste_masks(masks, boxes, 80, 90, threshold=-1.0, chunk_size=chunk_size), one_chunk)


def test_paste_100_masks_on_a_full_size_image():
    gen = torch.Generator().manual_seed(2)
    masks = torch.rand(100, 28, 28, generator=gen)
    xy = torch.rand(100, 2, generator=gen) * torch.tensor([1200.0, 700.0])
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=gen) * 300 + 1], 1)
    pasted = paste_masks(masks, boxes, 800, 1333)
    assert pasted.shape == (100, 800, 1333) and pasted.dtype == torch.bool
    assert torch.equal(pasted[37:38], paste_masks(masks[37:38], boxes[37:38], 800, 1333))


def test_paste_empty():
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), 10, 12).shape == (0, 10, 12)


@pytest.mark.reference
def test_paste_matches_mmdet_do_paste_mask(mmdet_fixture):
    ref = mmdet_fixture["paste"]
    soft = paste_masks(ref["probs"], ref["boxes"], ref["img_h"], ref["img_w"], threshold=-1.0, chunk_size=3)
    assert_close_to_reference(soft, ref["soft"], msg="soft masks")
    binary = paste_masks(ref["probs"], ref["boxes"], ref["img_h"], ref["img_w"], threshold=0.5, chunk_size=3)
    # pixels may flip only where mmdet's soft value sits at the 0.5 threshold
    _, flips = threshold_flips(binary.double(), ref["soft"], 0.5)
    assert flips.ok, flips
