"""Small PIL charts for the analysis tools (the project has no plotting library): a labelled heat map and a grid of
line charts."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
CURVE_COLORS = [(31, 119, 180), (44, 160, 44), (255, 127, 14), (214, 39, 40), (148, 103, 189)]


def _font():
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font())
    return right - left, bottom - top


def heatmap(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            row_title: str, col_title: str, cell: int = 22) -> Image.Image:
    """``values`` (R, C) in [0, 100] as shades of blue, each cell's value written in it, labels on both axes."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, s)[0] for s in list(row_labels) + list(col_labels)) + 8
    top, left = label_w + 40, label_w + 24
    rows, cols = values.shape
    image = Image.new("RGB", (left + cols * cell + 10, top + rows * cell + 10), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((left, 4), title, fill=BLACK, font=_font())
    draw.text((left, 18), f"columns: {col_title}", fill=BLACK, font=_font())
    rotated = Image.new("RGB", (label_w + 12, 12), WHITE)
    ImageDraw.Draw(rotated).text((0, 0), row_title, fill=BLACK, font=_font())
    image.paste(rotated.rotate(90, expand=True), (2, top))
    for j, label in enumerate(col_labels):  # column labels, vertical
        text = Image.new("RGB", (label_w, cell - 4), WHITE)
        ImageDraw.Draw(text).text((label_w - _text_size(probe, label)[0] - 4, 2), label, fill=BLACK, font=_font())
        image.paste(text.rotate(90, expand=True), (left + j * cell + 2, top - label_w - 4))
    for i, label in enumerate(row_labels):
        draw.text((left - _text_size(probe, label)[0] - 6, top + i * cell + 5), label, fill=BLACK, font=_font())
    for i in range(rows):
        for j in range(cols):
            v = float(values[i, j])
            shade = int(255 - 2.0 * min(max(v, 0.0), 100.0))
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell, y + cell], fill=(shade, shade, 255), outline=GREY)
            if v >= 0.5:
                text = f"{v:.0f}"
                w, _ = _text_size(draw, text)
                draw.text((x + (cell - w) / 2, y + 5), text, fill=WHITE if v > 60 else BLACK, font=_font())
    return image


def line_chart_grid(charts: Sequence[tuple[str, dict[str, np.ndarray]]], x: np.ndarray, title: str,
                    x_label: str, y_label: str, columns: int = 6, size: tuple[int, int] = (190, 150)) -> Image.Image:
    """One small chart per ``(title, {curve name: y values over x})`` on a shared legend; axes span [0, 1]."""
    names = list(charts[0][1]) if charts else []
    rows = max(1, -(-len(charts) // columns))
    cw, ch = size
    header = 40
    image = Image.new("RGB", (columns * cw + 10, header + rows * ch + 10), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), f"{title}   (x: {x_label}, y: {y_label})", fill=BLACK, font=_font())
    lx = 8
    for k, name in enumerate(names):
        color = CURVE_COLORS[k % len(CURVE_COLORS)]
        draw.line([lx, 26, lx + 18, 26], fill=color, width=3)
        draw.text((lx + 22, 20), name, fill=BLACK, font=_font())
        lx += 30 + _text_size(draw, name)[0]
    for index, (chart_title, curves) in enumerate(charts):
        ox, oy = 5 + (index % columns) * cw, header + (index // columns) * ch
        x0, y0, x1, y1 = ox + 28, oy + 18, ox + cw - 8, oy + ch - 20
        draw.text((ox + 28, oy + 3), chart_title, fill=BLACK, font=_font())
        draw.rectangle([x0, y0, x1, y1], outline=BLACK)
        for t in (0.5,):
            gy = y1 - t * (y1 - y0)
            draw.line([x0, gy, x1, gy], fill=GREY)
        draw.text((ox + 4, y0 - 4), "1", fill=BLACK, font=_font())
        draw.text((ox + 4, y1 - 8), "0", fill=BLACK, font=_font())
        draw.text((x1 - 4, y1 + 4), "1", fill=BLACK, font=_font())
        for k, (_, y) in enumerate(curves.items()):
            valid = y >= 0
            if valid.sum() < 2:
                continue
            points = [(x0 + float(a) * (x1 - x0), y1 - float(b) * (y1 - y0)) for a, b in zip(x[valid], y[valid])]
            draw.line(points, fill=CURVE_COLORS[k % len(CURVE_COLORS)], width=2)
    return image
