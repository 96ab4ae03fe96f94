"""Reading image files and the header check, on a real COCO photograph made bad in each way a cluster meets."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from htc_lightning.data.images import BadImageError, check_image, check_images, read_rgb

PHOTO = Path(__file__).parent / "fixtures" / "bad_images" / "images" / "000000483330.jpg"  # 400x302


def _exif_rotated(tmp_path, orientation=6) -> Path:
    """The photo stored turned on its side with an EXIF tag saying how to turn it upright, as a phone does."""
    upright = Image.open(PHOTO)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what ROTATE_270 (orientation 6) turns back upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_a_coco_photo_reads_as_uint8_rgb_of_its_size():
    image = read_rgb(PHOTO, (400, 302))
    assert image.shape == (3, 302, 400) and image.dtype == torch.uint8
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(PHOTO).convert("RGB"))))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_as_pillow_exif_transpose(tmp_path, orientation):
    path = _exif_rotated(tmp_path, orientation)
    expected = np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    image = read_rgb(path)
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(expected))


def test_exif_rotated_photo_with_the_upright_size_in_the_json_reads_upright(tmp_path):
    path = _exif_rotated(tmp_path)
    assert Image.open(path).size == (302, 400)  # stored on its side
    image = read_rgb(path, (400, 302))  # the json gives the upright size, as annotation tools write it
    assert image.shape == (3, 302, 400)
    original = torch.from_numpy(np.array(Image.open(PHOTO))).permute(2, 0, 1).float()
    assert (image.float() - original).abs().mean() < 3  # the same picture, up to JPEG re-encoding


def test_exif_rotated_photo_with_the_stored_size_in_the_json_names_both_fixes(tmp_path):
    path = _exif_rotated(tmp_path)
    with pytest.raises(BadImageError) as info:
        read_rgb(path, (302, 400))
    message = str(info.value)
    assert str(path) in message and "EXIF orientation 6" in message and "400x302" in message
    assert "exiftool -Orientation=" in message and "swap width and height" in message
    assert "bad_images skip" in message and "check_dataset" in message


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    gray = np.array(Image.open(PHOTO).convert("L"), dtype=np.uint16) * 257  # 0..65535
    path = tmp_path / "depth16.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = read_rgb(path)
    assert torch.equal(image[0], image[2])
    assert torch.equal(image[0], torch.from_numpy(np.array(Image.open(PHOTO).convert("L"))))  # v*257 -> v


def test_thirty_two_bit_integer_pixels_beyond_sixteen_bits_are_an_error(tmp_path):
    path = tmp_path / "int32.tif"
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(path)
    with pytest.raises(BadImageError, match="outside 0..65535"):
        read_rgb(path)


def test_float_images_are_an_error_naming_the_mode(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((8, 8), np.float32)).save(path)
    with pytest.raises(BadImageError, match="mode F is not supported"):
        read_rgb(path)
    assert "mode F is not supported" in check_image(path)


def test_truncated_jpeg_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(PHOTO.read_bytes()[:20000])
    with pytest.raises(BadImageError) as info:
        read_rgb(path)
    assert str(path) in str(info.value) and "bad_images skip" in str(info.value)


def test_the_check_finds_truncation_without_flagging_data_after_the_end_marker(tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(PHOTO.read_bytes()[:20000])
    trailer = tmp_path / "motion_photo.jpg"  # phones append data (a video) after the JPEG's end marker
    trailer.write_bytes(PHOTO.read_bytes() + b"\x00ftypmp42" + bytes(5000))
    assert "cannot decode" in check_image(cut)
    assert check_image(trailer) is None
    assert read_rgb(trailer).shape == (3, 302, 400)


def test_the_check_reports_every_kind_of_problem_at_once(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.touch()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(PHOTO.read_bytes()[:20000])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    rotated = _exif_rotated(tmp_path)
    items = [(PHOTO, (400, 302)), (empty, None), (cut, (400, 302)), (PHOTO, (640, 480)), (not_image, None),
             (rotated, (302, 400)), (rotated, (400, 302)), (tmp_path / "gone.jpg", None)]
    problems = check_images(items, num_threads=3)
    reasons = {p.index: p.reason for p in problems}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 7]
    assert reasons[1] == "the file is empty (0 bytes)"
    assert reasons[3] == "it is 400x302 but the annotation file says 640x480"
    assert "EXIF orientation 6" in reasons[5]
    assert all(problems[i].path == str(items[problems[i].index][0]) for i in range(len(problems)))


def test_the_check_reads_headers_only_unless_asked_to_decode(tmp_path):
    # a PNG whose pixel data is damaged in the middle, header and end chunk intact: only a full decode sees it
    path = tmp_path / "damaged.png"
    Image.open(PHOTO).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert check_image(path, (400, 302)) is None
    with pytest.raises(BadImageError, match="damaged.png"):
        read_rgb(path)
    assert "cannot decode" in check_image(path, (400, 302), decode=True)
