import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align as tv_roi_align

from htc_lightning.accel.roi_align_cpu import (
    VectorisedCPURoIAlign,
    roi_align,
    roi_align_backward_cpu,
    use_vectorised_roi_align,
)
from htc_lightning.models.layers.roi_extractor import MultiLevelRoIAlign


def _rois(n: int, batch: int, extent: float, min_size: float, max_size: float, seed: int,
          offset: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * extent - offset
    wh = min_size + torch.rand(n, 2, generator=gen) * (max_size - min_size)
    b = torch.randint(0, batch, (n, 1), generator=gen).float()
    return torch.cat([b, xy, xy + wh], 1)


def _grads(feat, rois, size, scale, sampling_ratio=0, aligned=True, seed=0):
    """(ours, torchvision's) feature gradients for the same random upstream gradient."""
    results = []
    for fn in (roi_align, tv_roi_align):
        x = feat.detach().clone().requires_grad_(True)
        out = fn(x, rois, size, scale, sampling_ratio, aligned)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
        out.backward(upstream)
        results.append(x.grad)
    return results


@pytest.fixture(autouse=True)
def _our_forward_at_any_width(monkeypatch):
    """The test features are narrow; without this most of them would take torchvision's forward."""
    import htc_lightning.accel.roi_align_cpu as module

    monkeypatch.setattr(module, "_MIN_CHANNELS", 1)


def _feat(batch=2, channels=3, height=12, width=15, seed=0, dtype=torch.float32):
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


# both forward paths: every window batched (huge threshold), every RoI alone (threshold 0), and the default mix
FORWARD_PATHS = [10**9, 0, None]

# (feature kwargs, rois, output size, spatial scale, sampling ratio, aligned): adaptive and fixed grids,
# unaligned, tiny and large RoIs, RoIs partly or wholly off the map, exact pixel-centre samples, a one-row map
FORWARD_CASES = [
    ({"channels": 5}, _rois(40, 2, 50.0, 1.0, 60.0, seed=1), 7, 0.25, 0, True),
    ({"channels": 5}, _rois(40, 2, 50.0, 1.0, 60.0, seed=1), (5, 3), 0.5, 2, False),
    ({"channels": 5}, _rois(40, 2, 50.0, 1.0, 60.0, seed=1), 14, 0.125, 0, True),
    ({"channels": 4, "height": 40, "width": 50}, _rois(30, 2, 100.0, 60.0, 200.0, seed=2), 7, 0.25, 0, True),
    ({}, _rois(60, 2, 120.0, 2.0, 90.0, seed=5, offset=40.0), 7, 0.25, 0, True),
    ({}, torch.tensor([[0.0, -30.0, -30.0, -8.0, -6.0], [1.0, 70.0, 10.0, 90.0, 30.0], [0.0, 3.0, 3.0, 3.0, 3.0],
                       [1.0, 5.0, 6.0, 2.0, 1.0]]), 7, 0.25, 0, True),
    ({"height": 8, "width": 8}, torch.tensor([[0.0, 0.0, 0.0, 8.0, 8.0], [0.0, -0.5, -0.5, 8.5, 8.5],
                                              [1.0, 7.0, 7.0, 9.0, 9.0], [1.0, -1.5, -1.5, 0.5, 0.5]]),
     2, 1.0, 0, False),
    ({"height": 1, "width": 9}, _rois(10, 2, 30.0, 1.0, 20.0, seed=6), 3, 0.5, 0, True),
]


@pytest.mark.parametrize("threshold", FORWARD_PATHS)
@pytest.mark.parametrize("case", range(len(FORWARD_CASES)))
def test_forward_equals_torchvision(case, threshold, monkeypatch):
    import htc_lightning.accel.roi_align_cpu as module

    if threshold is not None:
        monkeypatch.setattr(module, "_SMALL_WINDOW", threshold)
    feat_kwargs, rois, size, scale, ratio, aligned = FORWARD_CASES[case]
    feat = _feat(**feat_kwargs)
    ours = roi_align(feat, rois, size, scale, ratio, aligned)
    torch.testing.assert_close(ours, tv_roi_align(feat, rois, size, scale, ratio, aligned), rtol=1e-5, atol=1e-6)


def test_forward_equals_torchvision_when_small_windows_are_split_into_chunks(monkeypatch):
    import htc_lightning.accel.roi_align_cpu as module

    monkeypatch.setattr(module, "_CHUNK_BYTES", 1)  # every RoI its own group
    feat = _feat()
    rois = _rois(25, 2, 50.0, 2.0, 60.0, seed=7)
    torch.testing.assert_close(roi_align(feat, rois, 7, 0.25), tv_roi_align(feat, rois, 7, 0.25, 0, True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold", FORWARD_PATHS)
def test_avg_pool_equals_roi_align_then_average_pooling(threshold, monkeypatch):
    import htc_lightning.accel.roi_align_cpu as module

    if threshold is not None:
        monkeypatch.setattr(module, "_SMALL_WINDOW", threshold)
    feat = _feat(channels=6, height=30, width=40)
    rois = _rois(50, 2, 250.0, 4.0, 200.0, seed=11)
    x = feat.clone().requires_grad_(True)
    ours = roi_align(x, rois, 14, 0.125, avg_pool=2)
    ref_x = feat.clone().requires_grad_(True)
    ref = F.adaptive_avg_pool2d(tv_roi_align(ref_x, rois, 14, 0.125, 0, True), 7)
    assert ours.shape == (50, 6, 7, 7)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    ours.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)


def test_avg_pool_must_divide_the_output_size():
    with pytest.raises(ValueError, match="avg_pool 3 must be >= 1 and divide output_size"):
        roi_align(_feat(), _rois(2, 2, 10.0, 2.0, 5.0, seed=0), 14, 0.25, avg_pool=3)


def test_forward_rejects_a_batch_index_outside_the_features():
    with pytest.raises(ValueError, match="batch index 2 outside"):
        roi_align(_feat(), torch.tensor([[2.0, 0.0, 0.0, 4.0, 4.0]]), 7, 0.25)


def test_narrow_features_use_torchvision_forward_and_wide_ones_ours(monkeypatch):
    import htc_lightning.accel.roi_align_cpu as module

    monkeypatch.setattr(module, "_MIN_CHANNELS", 8)
    calls = []
    original = module.roi_align_forward_cpu
    monkeypatch.setattr(module, "roi_align_forward_cpu",
                        lambda feat, *a: calls.append(feat.shape[1]) or original(feat, *a))
    rois = _rois(20, 2, 50.0, 2.0, 40.0, seed=9)
    narrow, wide = _feat(channels=4), _feat(channels=8)
    assert torch.equal(roi_align(narrow, rois, 7, 0.25), tv_roi_align(narrow, rois, 7, 0.25, 0, True))
    torch.testing.assert_close(roi_align(wide, rois, 7, 0.25), tv_roi_align(wide, rois, 7, 0.25, 0, True),
                               rtol=1e-5, atol=1e-6)
    roi_align(narrow, rois, 14, 0.25, avg_pool=2)  # pooled outputs take ours at any width
    assert calls == [8, 4]


def test_forward_under_cpu_autocast_pools_in_float32():
    feat = _feat(channels=6)
    rois = _rois(30, 2, 50.0, 2.0, 60.0, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(feat, rois, 14, 0.25, avg_pool=2)
    assert out.dtype == torch.float32
    ref = F.avg_pool2d(tv_roi_align(feat, rois, 14, 0.25, 0, True), 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_float64_and_half_features_and_exporting_use_torchvision(monkeypatch):
    import htc_lightning.accel.roi_align_cpu as module

    def not_ours(*args):
        raise AssertionError("the vectorised forward ran")

    monkeypatch.setattr(module, "roi_align_forward_cpu", not_ours)
    rois = _rois(20, 2, 50.0, 2.0, 40.0, seed=9)
    for dtype in (torch.float64, torch.float16):
        feat = _feat(dtype=dtype)
        assert torch.equal(roi_align(feat, rois.to(dtype), 7, 0.25),
                           tv_roi_align(feat, rois.to(dtype), 7, 0.25, 0, True))
    monkeypatch.setattr(module, "exporting", lambda: True)  # the exporters know torchvision's op
    assert torch.equal(roi_align(_feat(), rois, 14, 0.25, avg_pool=2),
                       F.avg_pool2d(tv_roi_align(_feat(), rois, 14, 0.25, 0, True), 2))


@pytest.mark.parametrize("size", [7, 14, (3, 5)])
def test_gradient_equals_torchvision_adaptive_sampling(size):
    feat = _feat(channels=4)
    rois = _rois(60, 2, 50.0, 2.0, 60.0, seed=2)
    ours, ref = _grads(feat, rois, size, 0.25)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_gradient_equals_torchvision_fixed_sampling_ratio(ratio):
    feat = _feat()
    rois = _rois(30, 2, 50.0, 2.0, 60.0, seed=3)
    ours, ref = _grads(feat, rois, 7, 0.25, sampling_ratio=ratio)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_gradient_equals_torchvision_unaligned_with_tiny_rois():
    feat = _feat()
    rois = _rois(30, 2, 50.0, 0.0, 6.0, seed=4)  # below one feature pixel: torchvision forces 1x1
    ours, ref = _grads(feat, rois, 7, 0.25, aligned=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_gradient_equals_torchvision_for_rois_partly_or_fully_outside_the_map():
    feat = _feat()
    rois = _rois(60, 2, 120.0, 2.0, 90.0, seed=5, offset=40.0)  # map covers [0, 60) x [0, 48) px
    rois = torch.cat([rois, torch.tensor([[0.0, -30.0, -30.0, -8.0, -6.0], [1.0, 70.0, 10.0, 90.0, 30.0]])])
    ours, ref = _grads(feat, rois, 7, 0.25)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_gradient_equals_torchvision_on_map_edges_and_integer_sample_positions():
    feat = _feat(height=8, width=8)
    # with scale 1 and these boxes samples land exactly on pixel centres, on -1, on H and on H - 1
    rois = torch.tensor([[0.0, 0.0, 0.0, 8.0, 8.0], [0.0, -0.5, -0.5, 8.5, 8.5], [1.0, 7.0, 7.0, 9.0, 9.0],
                         [1.0, -1.5, -1.5, 0.5, 0.5], [0.0, 3.0, 3.0, 3.0, 3.0], [1.0, 5.0, 6.0, 2.0, 1.0]])
    for aligned in (True, False):
        ours, ref = _grads(feat, rois, 2, 1.0, aligned=aligned)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_gradient_equals_torchvision_for_one_pixel_high_map():
    feat = _feat(height=1, width=9)
    rois = _rois(10, 2, 30.0, 1.0, 20.0, seed=6)
    ours, ref = _grads(feat, rois, 3, 0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_gradient_equals_torchvision_when_rois_are_split_into_chunks(monkeypatch):
    import htc_lightning.accel.roi_align_cpu as module

    monkeypatch.setattr(module, "_CHUNK_BYTES", 1)  # every RoI its own chunk
    feat = _feat()
    rois = _rois(25, 2, 50.0, 2.0, 60.0, seed=7)
    ours, ref = _grads(feat, rois, 7, 0.25)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_large_sample_counts_are_processed_in_bounded_chunks(monkeypatch):
    import htc_lightning.accel.roi_align_cpu as module

    calls = []
    original = module._backward_chunk
    monkeypatch.setattr(module, "_backward_chunk", lambda grad, *a: calls.append(grad.shape[0]) or original(grad, *a))
    monkeypatch.setattr(module, "_CHUNK_BYTES", 2**20)
    feat = _feat(batch=1, channels=8, height=64, width=64)
    rois = _rois(20, 1, 10.0, 200.0, 250.0, seed=8)  # ~60 px at stride 4: 5x5 samples per 14x14 bin
    ours, ref = _grads(feat, rois, 14, 0.25)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert len(calls) > 1 and sum(calls) == 20


def test_empty_rois_give_zero_gradient():
    feat = _feat().requires_grad_(True)
    out = roi_align(feat, torch.zeros(0, 5), 7, 0.25)
    assert out.shape == (0, 3, 7, 7)
    (out.sum() + feat.sum() * 0).backward()
    assert torch.equal(feat.grad, torch.zeros_like(feat))


def test_bfloat16_features_pool_in_float32_and_return_bfloat16_gradient():
    feat = _feat()
    rois = _rois(20, 2, 50.0, 2.0, 40.0, seed=10)
    x = feat.bfloat16().requires_grad_(True)
    out = roi_align(x, rois.bfloat16(), 7, 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), tv_roi_align(feat.bfloat16().float(), rois.bfloat16().float(), 7, 0.25,
                                                         0, True), rtol=0, atol=1e-2)
    out.float().sum().backward()
    ref_x = feat.bfloat16().float().requires_grad_(True)
    tv_roi_align(ref_x, rois.bfloat16().float(), 7, 0.25, 0, True).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=1e-2, atol=1e-2)


def test_backward_rejects_a_batch_index_outside_the_features():
    rois = torch.tensor([[2.0, 1.0, 1.0, 20.0, 20.0]])
    with pytest.raises(ValueError, match="batch index 2"):
        roi_align_backward_cpu(torch.ones(1, 3, 7, 7), rois, 0.25, (7, 7), (2, 3, 12, 15), 0, True)


def test_every_roi_extractor_of_a_model_pools_with_the_vectorised_kernel_and_gets_the_same_numbers():
    pyramid, semantic = MultiLevelRoIAlign(14, (4, 8, 16, 32)), MultiLevelRoIAlign(14, (8,))
    model = torch.nn.ModuleDict({"mask_roi_extractor": pyramid, "head": torch.nn.Sequential(semantic)})
    assert use_vectorised_roi_align(model) == 2
    assert pyramid.kernel is roi_align and semantic.kernel is roi_align
    # the swapped kernel pools as torchvision's does: pooled output and gradient on every level
    feats = [torch.randn(1, 8, 256 // s, 320 // s, generator=torch.Generator().manual_seed(s)) for s in (4, 8, 16, 32)]
    rois = _rois(40, 1, 250.0, 4.0, 500.0, seed=13)
    results = []
    for extractor in (MultiLevelRoIAlign(14, (4, 8, 16, 32)), pyramid):
        xs = [f.clone().requires_grad_(True) for f in feats]
        out = extractor(xs, rois, avg_pool=2)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append((out, [x.grad for x in xs]))
    (ref, ref_grads), (ours, our_grads) = results
    assert len(set(pyramid.map_roi_levels(rois, 4).tolist())) == 4
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(our_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_the_callback_refuses_a_model_without_roi_extractors():
    with pytest.raises(ValueError, match="no MultiLevelRoIAlign to speed up; remove the callback"):
        VectorisedCPURoIAlign().setup(None, torch.nn.Linear(2, 2), "fit")
