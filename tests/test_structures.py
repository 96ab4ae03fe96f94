"""The frame convention of ``structures.py``: sizes (h, w), factors (x, y), one pair of frame conversions, and
required meta fields that name the image they are missing from."""
import pytest
import torch

from htc_lightning.structures import pad_size_of, scale_boxes, scale_factor_of, to_original_frame, to_resized_frame

# a 60 x 90 (h x w) file resized to 64 x 120: x scaled by 120 / 90, y by 64 / 60
META = {"image_id": 7, "file_name": "a.jpg", "orig_size": (60, 90), "img_size": (64, 120), "pad_size": (64, 128),
        "scale_factor": (120 / 90, 64 / 60)}


def test_scale_factor_is_x_then_y_applied_to_the_x_and_y_columns():
    boxes = torch.tensor([[9.0, 6.0, 90.0, 60.0]])  # the whole original image's width and height
    assert to_resized_frame(boxes, META)[0].tolist() == pytest.approx([12.0, 6.4, 120.0, 64.0])


def test_to_original_frame_divides_by_the_scale_factor_bit_for_bit():
    boxes = torch.rand(5, 4) * 100
    expected = boxes / torch.tensor([120 / 90, 64 / 60, 120 / 90, 64 / 60])
    assert torch.equal(to_original_frame(boxes, META), expected)


def test_the_two_conversions_invert_each_other():
    boxes = torch.rand(5, 4) * 100
    torch.testing.assert_close(to_resized_frame(to_original_frame(boxes, META), META), boxes)


def test_class_specific_boxes_convert_per_class():
    boxes = torch.rand(5, 3, 4) * 100
    torch.testing.assert_close(to_original_frame(boxes, META), to_original_frame(boxes.view(-1, 4), META).view(5, 3, 4))


def test_scale_boxes_inverse_is_a_division():
    boxes = torch.tensor([[3.0, 3.0, 6.0, 6.0]])
    assert scale_boxes(boxes, (3.0, 1.5), inverse=True).tolist() == [[1.0, 2.0, 2.0, 4.0]]


def test_a_missing_scale_factor_is_an_error_naming_the_image_and_the_field():
    meta = {k: v for k, v in META.items() if k != "scale_factor"}
    with pytest.raises(ValueError, match="image 7 a.jpg: its meta has no 'scale_factor'"):
        to_original_frame(torch.zeros(1, 4), meta)
    with pytest.raises(ValueError, match="'scale_factor'"):
        scale_factor_of({})


def test_a_missing_pad_size_is_an_error_not_the_image_size():
    meta = {k: v for k, v in META.items() if k != "pad_size"}
    with pytest.raises(ValueError, match="image 7 a.jpg: its meta has no 'pad_size'"):
        pad_size_of(meta)
    with pytest.raises(ValueError, match="'pad_size'"):
        pad_size_of(meta, (64, 120))


def test_the_anchors_take_the_padded_size_and_reject_one_smaller_than_the_image():
    assert pad_size_of(META, (64, 120)) == pad_size_of(META) == (64, 128)
    with pytest.raises(ValueError, match=r"image 7 a.jpg: pad_size \(64, 128\) is smaller than its img_size"):
        pad_size_of(META, (64, 130))
