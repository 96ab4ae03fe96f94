"""BoxCoder: mmdet's DeltaXYWHBBoxCoder numbers, round trip, wh clamp, border clipping."""
import math
from pathlib import Path

import pytest
import torch

from htc_lightning.models.layers.box_coder import BoxCoder
from htc_lightning.tools.compare import assert_close_to_reference

FIXTURE = Path(__file__).parent / "fixtures" / "layers" / "mmdet_anchor_assign.pt"


@pytest.fixture(scope="module")
def mmdet_coder():
    return torch.load(FIXTURE, weights_only=False)["coder"]


def _coder(kwargs: dict) -> BoxCoder:
    return BoxCoder(means=kwargs.get("target_means", (0.0,) * 4), stds=kwargs.get("target_stds", (1.0,) * 4),
                    clip_border=kwargs.get("clip_border", True))


@pytest.mark.reference
@pytest.mark.parametrize("case", ["unit", "rcnn", "means", "noclip"])
def test_encode_and_decode_equal_mmdet(mmdet_coder, case):
    data, expected = mmdet_coder, mmdet_coder["cases"][case]
    coder = _coder(expected["kwargs"])
    assert_close_to_reference(coder.encode(data["boxes"], data["gts"]), expected["encoded"], msg="encode")
    assert_close_to_reference(coder.decode(data["boxes"], data["deltas"], data["max_shape"]), expected["decoded"],
                              msg="decode")
    assert_close_to_reference(coder.decode(data["boxes"], data["deltas"]), expected["decoded_noshape"],
                              msg="decode without max_shape")


@pytest.mark.reference
def test_per_class_deltas_decode_like_mmdet(mmdet_coder):
    expected = mmdet_coder["cases"]["rcnn"]
    out = _coder(expected["kwargs"]).decode(mmdet_coder["boxes"], mmdet_coder["deltas_cls"], mmdet_coder["max_shape"])
    assert out.shape == (30, 12)
    assert_close_to_reference(out, expected["decoded_cls"], msg="per-class decode")


def test_decode_inverts_encode_with_stds():
    coder = BoxCoder(stds=(0.1, 0.1, 0.2, 0.2), clip_border=False)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 7.0, 6.0], [30.0, 10.0, 90.0, 40.0]])
    gts = torch.tensor([[2.0, 1.0, 14.0, 15.0], [4.0, 4.0, 9.0, 8.0], [25.0, 20.0, 80.0, 50.0]])
    torch.testing.assert_close(coder.decode(boxes, coder.encode(boxes, gts)), gts)


def test_encode_hand_derived_deltas():
    deltas = BoxCoder(means=(0.0, 0.0, 0.0, 0.0), stds=(0.5, 0.5, 1.0, 1.0)).encode(
        torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 0.0, 25.0, 5.0]]))
    torch.testing.assert_close(deltas, torch.tensor([[1.0 / 0.5, -0.25 / 0.5, math.log(2.0), math.log(0.5)]]))


def test_decode_clamps_log_scale_to_log_1000_over_16():
    coder = BoxCoder()
    out = coder.decode(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 10.0, -10.0]]))
    w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
    torch.testing.assert_close(w, torch.tensor(2.0 * 1000 / 16))
    torch.testing.assert_close(h, torch.tensor(2.0 * 16 / 1000))


def test_decode_clips_to_max_shape_only_when_clip_border():
    boxes, deltas = torch.tensor([[-5.0, -5.0, 40.0, 60.0]]), torch.zeros(1, 4)
    assert BoxCoder().decode(boxes, deltas, max_shape=(50, 30)).tolist() == [[0.0, 0.0, 30.0, 50.0]]
    assert BoxCoder(clip_border=False).decode(boxes, deltas, max_shape=(50, 30)).tolist() == [[-5.0, -5.0, 40.0, 60.0]]


def test_encode_decode_work_on_leading_batch_dims():
    coder = BoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 7.0, 6.0]]).expand(3, 2, 4)
    gts = torch.tensor([[2.0, 1.0, 14.0, 15.0], [4.0, 4.0, 9.0, 8.0]]).expand(3, 2, 4)
    deltas = coder.encode(boxes, gts)
    assert deltas.shape == (3, 2, 4)
    torch.testing.assert_close(deltas[1], coder.encode(boxes[0], gts[0]))
    torch.testing.assert_close(coder.decode(boxes, deltas), gts)


def test_encode_returns_float32_for_half_inputs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float16)
    assert BoxCoder().encode(boxes, boxes).dtype == torch.float32


def test_empty_inputs_give_empty_outputs():
    coder = BoxCoder()
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 8), max_shape=(10, 10)).shape == (0, 8)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="BoxCoder.decode"):
        BoxCoder().decode(torch.zeros(3, 4), torch.zeros(2, 4))
