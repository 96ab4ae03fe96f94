"""AnchorGenerator: mmdet's anchor layout, valid flags, GA-RPN approx/square generators, caching."""
from pathlib import Path

import pytest
import torch

from htc_lightning.models.layers.anchors import AnchorGenerator, anchor_inside_flags

FIXTURE = Path(__file__).parent / "fixtures" / "layers" / "mmdet_anchor_assign.pt"


@pytest.fixture(scope="module")
def mmdet_anchors():
    return torch.load(FIXTURE, weights_only=False)["anchors"]


def test_single_anchor_grid_matches_hand_derived_centres_at_i_times_stride():
    gen = AnchorGenerator(strides=[16], ratios=[1.0], scales=[1.0], base_sizes=[9])
    (anchors,) = gen.grid_anchors([(2, 2)])
    expected = torch.tensor([[-4.5, -4.5, 4.5, 4.5], [11.5, -4.5, 20.5, 4.5],
                             [-4.5, 11.5, 4.5, 20.5], [11.5, 11.5, 20.5, 20.5]])
    assert torch.equal(anchors, expected)


def test_base_anchors_are_ratio_major_with_h_over_w_equal_to_ratio():
    gen = AnchorGenerator(strides=[4], ratios=[0.5, 2.0], scales=[2.0, 4.0])
    base = gen.base_anchors(0)
    w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    # index = ratio_idx * num_scales + scale_idx
    torch.testing.assert_close(h / w, torch.tensor([0.5, 0.5, 2.0, 2.0]))
    torch.testing.assert_close(torch.sqrt(w * h), torch.tensor([8.0, 16.0, 8.0, 16.0]))


def test_grid_is_location_major_row_by_row():
    gen = AnchorGenerator(strides=[8], ratios=[0.5, 1.0, 2.0], scales=[8])
    (anchors,) = gen.grid_anchors([(2, 3)])
    base = gen.base_anchors(0)
    a = gen.num_base_anchors
    for y in range(2):
        for x in range(3):
            shift = torch.tensor([x * 8.0, y * 8.0, x * 8.0, y * 8.0])
            assert torch.equal(anchors[(y * 3 + x) * a:(y * 3 + x + 1) * a], base + shift)


@pytest.mark.reference
@pytest.mark.parametrize("name", ["rpn", "approx", "square", "offset"])
def test_grid_anchors_equal_mmdet(mmdet_anchors, name):
    case = mmdet_anchors[name]
    gen = AnchorGenerator(**case["kwargs"])
    for level, expected in enumerate(case["base_anchors"]):
        assert torch.equal(gen.base_anchors(level), expected)
    for ours, expected in zip(gen.grid_anchors(case["featmap_sizes"]), case["grid"], strict=True):
        assert torch.equal(ours, expected)


@pytest.mark.reference
@pytest.mark.parametrize("name", ["rpn", "approx", "offset"])
def test_valid_flags_equal_mmdet(mmdet_anchors, name):
    case = mmdet_anchors[name]
    gen = AnchorGenerator(**case["kwargs"])
    for ours, expected in zip(gen.valid_flags(case["featmap_sizes"], case["pad_shape"]), case["valid"], strict=True):
        assert ours.dtype == torch.bool
        assert torch.equal(ours, expected)


def test_valid_flags_use_ceil_of_image_over_stride():
    gen = AnchorGenerator(strides=[8], ratios=[1.0, 2.0], scales=[8])
    (flags,) = gen.valid_flags([(4, 5)], img_size=(17, 9))  # ceil(17/8)=3 rows, ceil(9/8)=2 cols
    per_loc = flags.view(4, 5, 2)
    assert per_loc[:3, :2].all() and not per_loc[3:].any() and not per_loc[:, 2:].any()


def test_ga_approx_generator_has_nine_anchors_at_three_octave_scales():
    gen = AnchorGenerator(strides=[4, 8], ratios=[0.5, 1.0, 2.0], octave_base_scale=8, scales_per_octave=3)
    assert gen.num_base_anchors == 9
    base = gen.base_anchors(1)
    sizes = torch.sqrt((base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1]))
    expected = torch.tensor([8 * 8 * 2 ** (i / 3) for i in range(3)]).repeat(3)
    torch.testing.assert_close(sizes, expected)
    assert [a.shape[0] for a in gen.grid_anchors([(3, 4), (2, 2)])] == [3 * 4 * 9, 2 * 2 * 9]


def test_ga_square_generator_is_one_square_of_eight_strides_per_location():
    gen = AnchorGenerator(strides=[4, 8, 16, 32, 64], ratios=[1.0], scales=[8])
    assert gen.num_base_anchors == 1
    for level, stride in enumerate(gen.strides):
        assert torch.equal(gen.base_anchors(level), torch.tensor([[-4.0, -4.0, 4.0, 4.0]]) * stride)


def test_grid_anchors_are_cached_per_sizes_and_recomputed_for_new_sizes():
    gen = AnchorGenerator(strides=[8, 16], ratios=[1.0], scales=[8])
    first = gen.grid_anchors([(3, 4), (2, 2)])
    again = gen.grid_anchors([(3, 4), (2, 2)])
    assert all(a is b for a, b in zip(first, again))
    other = gen.grid_anchors([(2, 4), (1, 2)])
    assert other[0].shape[0] == 8 and other[0] is not first[0]


def test_mismatched_number_of_levels_names_the_strides():
    gen = AnchorGenerator(strides=[8, 16], ratios=[1.0], scales=[8])
    with pytest.raises(ValueError, match=r"1 feature maps for 2 strides"):
        gen.grid_anchors([(3, 4)])


def test_scales_and_octave_arguments_are_exclusive():
    with pytest.raises(ValueError, match="either `scales`"):
        AnchorGenerator(strides=[8], ratios=[1.0], scales=[8], octave_base_scale=8, scales_per_octave=3)
    with pytest.raises(ValueError, match="either `scales`"):
        AnchorGenerator(strides=[8], ratios=[1.0])


def test_anchor_inside_flags_strict_right_border_and_negative_border_keeps_valid():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-1.0, 0.0, 5.0, 5.0], [0.0, 0.0, 9.9, 9.9]])
    valid = torch.tensor([True, True, False])
    assert anchor_inside_flags(anchors, valid, (11, 11)).tolist() == [True, False, False]
    assert anchor_inside_flags(anchors, valid, (10, 11)).tolist() == [False, False, False]  # y2 < h is strict
    assert anchor_inside_flags(anchors, valid, (11, 11), allowed_border=1).tolist() == [True, True, False]
    assert anchor_inside_flags(anchors, valid, (11, 11), allowed_border=-1) is valid


def test_grid_anchors_cache_is_keyed_by_device():
    gen = AnchorGenerator(strides=[8], ratios=[1.0], scales=[8])
    (on_cpu,) = gen.grid_anchors([(2, 2)], device="cpu")
    (on_meta,) = gen.grid_anchors([(2, 2)], device="meta")
    assert on_cpu.device.type == "cpu" and on_meta.device.type == "meta"
    assert gen.valid_flags([(2, 2)], (16, 16), device="meta")[0].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_grid_anchors_on_cuda_equal_cpu():
    gen = AnchorGenerator(strides=[4, 8], ratios=[0.5, 1.0, 2.0], scales=[8])
    for a, b in zip(gen.grid_anchors([(5, 7), (3, 4)], "cuda"), gen.grid_anchors([(5, 7), (3, 4)]), strict=True):
        assert a.is_cuda and torch.equal(a.cpu(), b)
