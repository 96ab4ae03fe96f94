"""The evaluator's RLE encoder searches only each mask's window of non-empty columns: its strings must be
byte for byte those of pycocotools.mask.encode on the whole masks."""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from htc_lightning.evaluation import encode_masks
from htc_lightning.evaluation.coco import _rle_counts
from htc_lightning.models.layers.masks import paste_masks


def _pycocotools(masks: torch.Tensor) -> list[bytes]:
    array = np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0))
    return [rle["counts"] for rle in mask_util.encode(array)]


def _edge_cases(h: int, w: int) -> torch.Tensor:
    masks = torch.zeros(12, h, w, dtype=torch.bool)
    masks[1] = True                                  # full
    masks[2, 0, 0] = True                            # first pixel
    masks[3, -1, -1] = True                          # last pixel
    masks[4, :, 0] = True                            # first column
    masks[5, :, -1] = True                           # last column
    masks[6, :, 2:5] = True                          # full-height band: runs continue across columns
    masks[7, 0, :] = masks[7, -1, :] = True          # top and bottom rows: a run wraps each column end
    masks[8, -1, 1] = masks[8, 0, 2] = True          # a column ends on 1, the next starts on 1
    masks[9, 1:3, 1:3] = True                        # inside
    masks[10, :, 1::2] = True                        # alternate columns
    masks[11] = torch.rand(h, w, generator=torch.Generator().manual_seed(h * w)) > 0.5
    return masks


# (1-pixel sides are in the random test)
@pytest.mark.parametrize("size", [(2, 5), (5, 6), (6, 9), (33, 17), (6, 16), (9, 24), (7, 29)])
def test_window_encoding_equals_pycocotools_on_edge_cases(size):
    masks = _edge_cases(*size)
    assert _rle_counts(masks) == _pycocotools(masks)


def test_window_encoding_equals_pycocotools_on_random_masks_of_every_density():
    g = torch.Generator().manual_seed(0)
    for density in (0.02, 0.3, 0.5, 0.7, 0.98):
        for _ in range(20):
            h, w = torch.randint(1, 20, (2,), generator=g).tolist()
            masks = torch.rand(4, h, w, generator=g) < density
            assert _rle_counts(masks) == _pycocotools(masks)


def test_window_encoding_equals_pycocotools_on_pasted_detection_masks():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(60, 2, generator=g) * torch.tensor([300.0, 200.0]) - 20  # some boxes cross the border
    boxes = torch.cat([xy, xy + 4 + torch.rand(60, 2, generator=g) * 150], dim=1)
    masks = paste_masks(torch.rand(60, 28, 28, generator=g), boxes, 213, 320)
    assert masks.dtype == torch.bool and masks.any()
    assert _rle_counts(masks) == _pycocotools(masks)
    assert _rle_counts(masks.to(torch.uint8) * 3) == _pycocotools(masks)  # any non-zero integer is foreground


def test_encode_masks_gives_json_ready_rles_and_refuses_float_masks():
    masks = _edge_cases(6, 9)
    assert encode_masks(masks) == [{"size": [6, 9], "counts": c.decode()} for c in _pycocotools(masks)]
    assert encode_masks(masks[:0]) == []
    with pytest.raises(ValueError, match="threshold them first"):
        encode_masks(masks.float())
