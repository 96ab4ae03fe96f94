"""Reading image files: decoding to uint8 RGB the way detectron2 and mmdet (OpenCV) see a photo, and a cheap
header check that finds bad files before training.

The rules, the same for decoding and for the check:

- EXIF orientation is applied, as detectron2 (``read_image``), mmdet (OpenCV's ``IMREAD_COLOR``) and the
  annotation tools that show a phone photo upright do. The json's ``width``/``height`` are those of the
  upright image; a file whose json gives its stored (unrotated) size is reported, naming both fixes.
- 16-bit images (``I;16`` PNG/TIFF, or 32-bit ``I`` holding 0..65535) are scaled to 0..255
  (``round(v * 255 / 65535)``), not clipped: Pillow's own conversion would saturate them to white.
- A file that cannot be decoded, is truncated, or has an unsupported mode raises :class:`BadImageError`,
  whose message names the file and what to do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

_ORIENTATION = 0x0112  # EXIF tag
# EXIF orientation -> the PIL transpose that makes the image upright (Pillow's ImageOps.exif_transpose table).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_BAND_ROWS = 256  # rows copied out of Pillow at a time for huge images
_BANDED_PIXELS = 1 << 24  # above ~16.8 MP, copy in bands: Pillow's tobytes() would hold the pixels twice more
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# What :func:`read_rgb` turns into RGB; "F" (float) and the exotic ones (LAB, HSV, ...) have no agreed range.
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "I", *_SIXTEEN_BIT)
FIX_HINT = ("fix or remove the file, set `--data.init_args.bad_images skip` to train past bad images (each is "
            "replaced by another and reported), or list them all first with `python -m "
            "htc_lightning.tools.check_dataset --data_root ROOT`")


class BadImageError(OSError):
    """An image file that cannot be used: undecodable, truncated, of an unsupported mode, or not of the size its
    annotation file says. ``path`` and ``reason`` are kept for reports."""

    def __init__(self, path: str | Path, reason: str | None = None, hint: str = FIX_HINT):
        if reason is None:  # one argument: a whole message (how DataLoader workers re-raise an exception)
            self.path, self.reason = "", str(path)
            super().__init__(str(path))
            return
        self.path, self.reason = str(path), reason
        super().__init__(f"bad image {path}: {reason}; {hint}" if hint else f"bad image {path}: {reason}")


def exif_orientation(im: Image.Image, header_only: bool = False) -> int:
    """The EXIF orientation (1..8; 1 = as stored). ``header_only`` reads no pixel data: a PNG whose eXIf chunk
    follows its pixels then counts as untagged."""
    if header_only and im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: detectron2 and OpenCV then load the image as stored too
        return 1
    return value if value in _TRANSPOSE else 1


def upright_size(im: Image.Image, orientation: int) -> tuple[int, int]:
    """(width, height) after applying ``orientation``."""
    width, height = im.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def size_mismatch(path: str | Path, im: Image.Image, orientation: int, expected: tuple[int, int]) -> str | None:
    """Why the image's upright size is not ``expected`` (width, height), or None when it is."""
    size = upright_size(im, orientation)
    if size == tuple(expected):
        return None
    w, h = expected
    if orientation in (5, 6, 7, 8) and im.size == (w, h):
        return (f"its EXIF orientation {orientation} turns it upright to {size[0]}x{size[1]}, but the annotation "
                f"file says {w}x{h}, its stored size. If the annotations were drawn on the stored pixels, remove the "
                f"tag (e.g. `exiftool -Orientation= -n {path}`); if on the upright photo, swap width and height "
                f"in the annotation file")
    return f"it is {size[0]}x{size[1]} but the annotation file says {w}x{h}"


def read_rgb(path: str | Path, expected_size: tuple[int, int] | None = None) -> Tensor:
    """Decodes an image file to uint8 (3, H, W) RGB, upright (EXIF orientation applied); grayscale, palette,
    RGBA, CMYK and 16-bit images are converted. ``expected_size`` (width, height) from an annotation file is
    checked against the upright size."""
    try:
        with Image.open(path) as im:
            if im.mode not in SUPPORTED_MODES:
                raise BadImageError(path, f"mode {im.mode} is not supported (8- or 16-bit grayscale, palette, RGB(A) "
                                          "or CMYK are); convert it to RGB")
            orientation = exif_orientation(im, header_only=True)
            if expected_size is not None:  # before decoding: a wrong size costs no decode
                reason = size_mismatch(path, im, orientation, expected_size)
                if reason is not None:
                    raise BadImageError(path, reason)
            im.load()  # PIL decodes lazily: force it so a truncated file fails here, naming the file
            array = _to_rgb_array(path, im)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"{e} (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)") from e
    except (OSError, SyntaxError, UnidentifiedImageError, ValueError) as e:
        raise BadImageError(path, f"cannot decode it ({e})") from e
    image = torch.from_numpy(array)
    if orientation != 1:
        image = _orient(image, orientation)
    # A channels-last view: torchvision's uint8 resize takes its fast path on it, no copy needed here.
    return image.permute(2, 0, 1)


def _to_rgb_array(path, im: Image.Image) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise BadImageError(path, f"32-bit integer pixels outside 0..65535 (min {values.min()}, max "
                                      f"{values.max()}); convert it to 8 or 16 bits")
        gray = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    width, height = rgb.size
    if width * height <= _BANDED_PIXELS:
        return np.array(rgb)
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, _BAND_ROWS):
        bottom = min(height, top + _BAND_ROWS)
        out[top:bottom] = np.asarray(rgb.crop((0, top, width, bottom)))
    return out


def _orient(image: Tensor, orientation: int) -> Tensor:
    """Applies an EXIF orientation to an (H, W, C) tensor, as Pillow's ``exif_transpose`` would."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(0, 1)  # TRANSPOSE: (x, y) -> (y, x)
    flip = {2: (1,), 3: (0, 1), 4: (0,), 5: (), 6: (1,), 7: (0, 1), 8: (0,)}[orientation]
    return image.flip(flip).contiguous() if flip else image.contiguous()


# -- the set-up check ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageProblem:
    """A bad image found by :func:`check_image`: ``index`` is its position in the caller's list."""

    index: int
    path: str
    reason: str


def check_image(path: str | Path, expected_size: tuple[int, int] | None = None, decode: bool = False) -> str | None:
    """Why the file would fail in training, or None. Reads the header (size, mode, EXIF orientation) and the last
    bytes of JPEG and PNG files (a missing end marker is confirmed by a full decode, as some cameras append data
    after it); ``decode`` decodes every file fully, catching corrupt data in the middle of a file too."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes)"
        with Image.open(path) as im:
            if im.mode not in SUPPORTED_MODES:
                return f"mode {im.mode} is not supported"
            orientation = exif_orientation(im, header_only=True)
            if expected_size is not None:
                reason = size_mismatch(path, im, orientation, expected_size)
                if reason is not None:
                    return reason
            if decode or not _has_end_marker(path, im.format):
                im.load()
                if im.mode == "I":
                    _to_rgb_array(path, im)
    except BadImageError as e:
        return e.reason
    except Image.DecompressionBombError as e:
        return f"{e} (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
    except (OSError, SyntaxError, UnidentifiedImageError, ValueError) as e:
        return f"cannot decode it ({e})"
    return None


def _has_end_marker(path: Path, fmt: str | None) -> bool:
    tail = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}.get(fmt or "")
    if tail is None:
        return True  # no cheap test for this format
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
        return tail in f.read()


def check_images(items: list[tuple[str | Path, tuple[int, int] | None]], num_threads: int = 16,
                 decode: bool = False) -> list[ImageProblem]:
    """:func:`check_image` over ``(path, (width, height) or None)`` items in a thread pool (the reads wait on
    the file system and Pillow releases the GIL while decoding); problems in the order of ``items``."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        return check_image(item[0], item[1], decode)

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        reasons = list(pool.map(one, items, chunksize=64))
    return [ImageProblem(i, str(items[i][0]), r) for i, r in enumerate(reasons) if r is not None]


def problem_report(problems: list[ImageProblem], source: str | Path, total: int) -> str:
    """One block of text listing every problem found among ``total`` images listed in ``source``."""
    lines = [f"{len(problems)} bad image(s) among the {total} listed in {source}:"]
    lines += [f"  {p.path}: {p.reason}" for p in sorted(problems, key=lambda p: p.path)]
    return "\n".join(lines)
