import math
from pathlib import Path

import pytest
import torch
from torchvision.ops import roi_align

from htc_lightning.models.layers.roi_extractor import MultiLevelRoIAlign
from htc_lightning.tools.compare import assert_close_to_reference

FIXTURE = Path(__file__).parent / "fixtures" / "layers" / "mmdet_layers.pt"
STRIDES = [4, 8, 16, 32]


def _square(side: float, batch: int = 0) -> list[float]:
    return [float(batch), 10.0, 10.0, 10.0 + side, 10.0 + side]


def _pyramid(seed: int = 0, batch: int = 2, channels: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, 256 // s, 320 // s, generator=gen) for s in STRIDES]


@pytest.mark.parametrize("side, level", [
    (8.0, 0), (111.0, 0), (112.0, 1), (223.0, 1), (224.0, 2), (448.0, 3), (2000.0, 3),
])
def test_map_roi_levels_by_sqrt_area(side, level):
    extractor = MultiLevelRoIAlign(7, STRIDES)
    assert extractor.map_roi_levels(torch.tensor([_square(side)]), 4).item() == level


def test_map_roi_levels_uses_geometric_mean_of_width_and_height():
    extractor = MultiLevelRoIAlign(7, STRIDES)
    rois = torch.tensor([[0.0, 0.0, 0.0, 448.0, 28.0], [0.0, 0.0, 0.0, 448.0, 29.0]])  # sqrt = 112 and 114
    assert extractor.map_roi_levels(rois, 4).tolist() == [1, 1]
    rois = torch.tensor([[0.0, 0.0, 0.0, 400.0, 30.0]])  # sqrt(12000) = 109.5
    assert extractor.map_roi_levels(rois, 4).tolist() == [0]


def test_forward_equals_roi_align_on_each_rois_level():
    feats = _pyramid()
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(30, 2, generator=gen) * 200
    wh = torch.rand(30, 2, generator=gen) * 300 + 2
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=gen).float(), xy, xy + wh], 1)
    extractor = MultiLevelRoIAlign(7, STRIDES)
    levels = extractor.map_roi_levels(rois, 4)
    out = extractor(feats, rois)
    assert out.shape == (30, 3, 7, 7)
    assert len(set(levels.tolist())) > 2
    for i in range(30):
        lvl = int(levels[i])
        expected = roi_align(feats[lvl], rois[i:i + 1], (7, 7), 1.0 / STRIDES[lvl], 0, True)
        assert torch.allclose(out[i:i + 1], expected, atol=1e-6)


def _mmcv_roi_align(feat: torch.Tensor, roi: list[float], size: int, scale: float) -> torch.Tensor:
    """mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)`` of one RoI, sample by sample in float64: the
    half-pixel offset, ceil(bin) samples per bin side, zero past [-1, H] x [-1, W], taps clamped at the edge."""
    feat = feat.double()
    _, channels, height, width = feat.shape
    b, x1, y1, x2, y2 = roi
    start_x, start_y = x1 * scale - 0.5, y1 * scale - 0.5
    bin_w, bin_h = (x2 - x1) * scale / size, (y2 - y1) * scale / size
    grid_w, grid_h = math.ceil(bin_w), math.ceil(bin_h)

    def axis(pos: float, extent: int) -> tuple[int, int, float]:
        pos = max(pos, 0.0)
        low = int(pos)
        if low >= extent - 1:
            return extent - 1, extent - 1, 0.0
        return low, low + 1, pos - low

    def bilinear(y: float, x: float) -> torch.Tensor:
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return torch.zeros(channels, dtype=torch.float64)
        (y0, y1_, ly), (x0, x1_, lx) = axis(y, height), axis(x, width)
        f = feat[int(b)]
        return ((1 - ly) * (1 - lx) * f[:, y0, x0] + (1 - ly) * lx * f[:, y0, x1_]
                + ly * (1 - lx) * f[:, y1_, x0] + ly * lx * f[:, y1_, x1_])

    out = torch.zeros(channels, size, size, dtype=torch.float64)
    for p in range(size):
        for q in range(size):
            for iy in range(grid_h):
                for ix in range(grid_w):
                    out[:, p, q] += bilinear(start_y + p * bin_h + (iy + 0.5) * bin_h / grid_h,
                                             start_x + q * bin_w + (ix + 0.5) * bin_w / grid_w)
            out[:, p, q] /= grid_h * grid_w
    return out


def test_pooling_is_mmcvs_roi_align_with_aligned_true_and_adaptive_sampling():
    feat = torch.randn(2, 3, 12, 15, generator=torch.Generator().manual_seed(4))
    # inside, partly and wholly off the stride-8 map (96 x 120 px), sub-pixel, and large (several samples a bin)
    rois = [[0.0, 10.0, 12.0, 60.0, 70.0], [1.0, -20.0, 40.0, 30.0, 110.0], [0.0, 100.0, 80.0, 140.0, 130.0],
            [1.0, 3.0, 5.0, 7.0, 6.0], [0.0, -300.0, -200.0, -250.0, -120.0], [1.0, 0.0, 0.0, 120.0, 96.0]]
    out = MultiLevelRoIAlign(7, [8])([feat], torch.tensor(rois))
    expected = torch.stack([_mmcv_roi_align(feat, roi, 7, 1 / 8) for roi in rois]).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_forward_uses_only_the_first_len_strides_features():
    feats = _pyramid() + [torch.full((2, 3, 4, 5), float("nan"))]
    rois = torch.tensor([_square(2000.0, batch=1)])
    out = MultiLevelRoIAlign(7, STRIDES)(feats, rois)
    assert torch.isfinite(out).all()


def test_single_stride_is_plain_roi_align():
    feat = torch.randn(1, 4, 32, 40)
    rois = torch.tensor([_square(20.0), _square(300.0)])
    out = MultiLevelRoIAlign(14, [8])([feat], rois)
    torch.testing.assert_close(out, roi_align(feat, rois, (14, 14), 1 / 8, 0, True), rtol=1e-5, atol=1e-6)


def test_avg_pool_averages_the_pooled_features_on_every_level():
    feats = _pyramid(channels=4)
    rois = torch.tensor([_square(s, b) for s, b in ((8.0, 0), (150.0, 1), (260.0, 0), (500.0, 1), (60.0, 1))])
    extractor = MultiLevelRoIAlign(14, STRIDES)
    assert len(set(extractor.map_roi_levels(rois, 4).tolist())) == 4
    pooled = extractor(feats, rois, avg_pool=2)
    assert pooled.shape == (5, 4, 7, 7)
    torch.testing.assert_close(pooled, torch.nn.functional.avg_pool2d(extractor(feats, rois), 2),
                               rtol=1e-5, atol=1e-6)


def test_empty_rois_give_empty_output_connected_to_the_graph():
    feats = [f.requires_grad_() for f in _pyramid()]
    out = MultiLevelRoIAlign(7, STRIDES)(feats, torch.zeros(0, 5))
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert all(f.grad is not None for f in feats)


def test_every_level_gets_a_gradient_even_when_unused():
    feats = [f.requires_grad_() for f in _pyramid()]
    MultiLevelRoIAlign(7, STRIDES)(feats, torch.tensor([_square(20.0)])).sum().backward()
    assert all(f.grad is not None for f in feats)


def test_fp16_features_pool_in_fp16_but_map_levels_in_fp32():
    feats = [f.half() for f in _pyramid()]
    # sqrt(w*h) just under 112: level 0 in fp32, but fp16 rounds 111.97 to 112 (level 1)
    rois = torch.tensor([[0.0, 0.0, 0.0, 111.97, 111.97]])
    assert torch.tensor(111.97).half().item() == 112.0
    out = MultiLevelRoIAlign(7, STRIDES)(feats, rois)
    assert out.dtype == torch.float16
    expected = roi_align(feats[0], rois.half(), (7, 7), 1 / 4, 0, True)
    assert torch.equal(out, expected)


def test_too_few_feature_maps_is_an_error():
    with pytest.raises(ValueError, match="2 feature maps for 4 strides"):
        MultiLevelRoIAlign(7, STRIDES)(_pyramid()[:2], torch.tensor([_square(20.0)]))


@pytest.mark.reference
def test_matches_mmdet_single_roi_extractor():
    ref = torch.load(FIXTURE, weights_only=False)["roi_extractor"]
    extractor = MultiLevelRoIAlign(7, STRIDES)
    assert torch.equal(extractor.map_roi_levels(ref["rois"], 4), ref["levels"])
    assert_close_to_reference(extractor(ref["feats"], ref["rois"]), ref["pooled"], msg="pooled")
