"""One picture of what a training run learned: the training loss curve, validation box/mask AP at each
evaluation, and a few validation images with the checkpoint's predicted masks (``make demo`` ends with it)::

    python -m htc_lightning.tools.demo_summary --config configs/demo/htc_tiny_synthetic.yaml \
        --ckpt_path outputs/demo/checkpoints/last.ckpt --out outputs/demo/summary.png

The curves are read from the run's logger output under ``trainer.default_root_dir``: TensorBoard event files
(Lightning's default logger when tensorboard is installed) or a CSVLogger's ``metrics.csv``; the newest run
that logged ``train/loss`` is used. Drawn with PIL only.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

Series = list[tuple[int, float]]
CURVES = ("train/loss", "val/bbox_mAP", "val/segm_mAP")


def _read_tensorboard(run: Path) -> dict[str, Series]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 1})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    return {t: [(e.step, float(e.value)) for e in acc.Scalars(t)] for t in CURVES if t in tags}


def _read_csv(path: Path) -> dict[str, Series]:
    out: dict[str, Series] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for tag in CURVES:
                if row.get(tag):
                    out.setdefault(tag, []).append((int(row["step"]), float(row[tag])))
    return out


def read_history(root: str | Path) -> dict[str, Series]:
    """``{tag: [(step, value)]}`` of the newest logged run under ``root`` that has ``train/loss``."""
    root = Path(root)
    logged = {p.parent for p in root.rglob("events.out.tfevents.*")} | {p.parent for p in root.rglob("metrics.csv")}
    runs = sorted(logged, key=lambda p: max(f.stat().st_mtime for f in p.iterdir()), reverse=True)
    for run in runs:
        history = _read_csv(run / "metrics.csv") if (run / "metrics.csv").is_file() else _read_tensorboard(run)
        if history.get("train/loss"):
            return history
    raise FileNotFoundError(f"no logged run with train/loss under {root} (TensorBoard events or metrics.csv)")


def _plot(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
          series: Sequence[tuple[str, Series, tuple[int, int, int]]], font, y_range: tuple[float, float] | None = None,
          markers: bool = False) -> None:
    """A line chart of ``series`` inside ``box`` (x0, y0, x1, y1), axes labelled with their ranges."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill="black", font=font)
    px0, py0, px1, py1 = x0 + 44, y0 + 18, x1 - 8, y1 - 18
    draw.rectangle((px0, py0, px1, py1), outline="black")
    points = [p for _, s, _ in series for p in s]
    if not points:
        draw.text((px0 + 8, py0 + 8), "nothing logged", fill="gray", font=font)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(max(xs), min(xs) + 1)
    ymin, ymax = y_range or (min(ys), max(ys))
    ymax = ymax if ymax > ymin else ymin + 1e-6
    draw.text((x0, py0), f"{ymax:.2f}", fill="black", font=font)
    draw.text((x0, py1 - 10), f"{ymin:.2f}", fill="black", font=font)
    draw.text((px0, py1 + 4), f"step {xmin}", fill="black", font=font)
    draw.text((px1 - 60, py1 + 4), f"step {xmax}", fill="black", font=font)
    for k, (name, s, color) in enumerate(series):
        xy = [(px0 + (px1 - px0) * (x - xmin) / (xmax - xmin), py1 - (py1 - py0) * (y - ymin) / (ymax - ymin))
              for x, y in s]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        if markers:
            for cx, cy in xy:
                draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=color)
        last = f"{name} {s[-1][1]:.3f}" if s else name
        draw.text((px1 - 130, py0 + 4 + 12 * k), last, fill=color, font=font)


def draw_summary(history: dict[str, Series], images: Sequence[Image.Image], out: str | Path,
                 title: str = "") -> Path:
    """Write the summary picture: loss curve and AP per evaluation on top, ``images`` below."""
    font = ImageFont.load_default()
    tile = 256
    width = max(2 * 400, tile * max(len(images), 1))
    canvas = Image.new("RGB", (width, 264 + (tile + 20 if images else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 4), title, fill="black", font=font)
    half = width // 2
    _plot(draw, (8, 24, half - 8, 260), "training loss (train/loss)",
          [("loss", history.get("train/loss", []), (31, 119, 180))], font)
    _plot(draw, (half + 8, 24, width - 8, 260), "validation AP per evaluation",
          [("box AP", history.get("val/bbox_mAP", []), (214, 39, 40)),
           ("mask AP", history.get("val/segm_mAP", []), (44, 160, 44))], font, y_range=(0.0, 1.0), markers=True)
    if images:
        draw.text((8, 264), "validation images with the checkpoint's predicted masks and boxes", fill="black",
                  font=font)
    for i, image in enumerate(images):
        scale = tile / max(image.width, image.height)  # small images are enlarged, pixels kept crisp
        thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.NEAREST if scale > 1 else Image.BILINEAR)
        canvas.paste(thumb, (i * tile + (tile - thumb.width) // 2, 280))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


@torch.no_grad()
def predicted_images(config: str, ckpt_path: str, num_images: int, score_thr: float = 0.3,
                     overrides: Sequence[str] = ()) -> list[Image.Image]:
    """The first ``num_images`` validation images with the checkpoint's detections (masks, boxes) drawn."""
    from htc_lightning.cli import HTCLightningCLI
    from htc_lightning.visualize import draw_detections, tensor_to_pil

    cli = HTCLightningCLI(args=["--config", config, "--trainer.logger", "false", *overrides], run=False)
    module, dm = cli.model, cli.datamodule
    module.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    module.eval()
    dm.setup("validate")
    drawn: list[Image.Image] = []
    for images, targets in dm.val_dataloader():
        metas = [t["meta"] for t in targets]
        for image, meta, det in zip(images, metas, module.detector.predict(images, metas)):
            pil = tensor_to_pil(image, meta, dm.mean, dm.std)
            drawn.append(draw_detections(pil, det, class_names=dm.class_names, score_thr=score_thr))
            if len(drawn) == num_images:
                return drawn
    return drawn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--logs", default=None, help="where the run logged (default: the checkpoint's run folder)")
    ap.add_argument("--num-images", type=int, default=4)
    ap.add_argument("--score-thr", type=float, default=0.3)
    args, overrides = ap.parse_known_args(argv)
    logs = Path(args.logs) if args.logs else Path(args.ckpt_path).resolve().parent.parent
    history = read_history(logs)
    images = predicted_images(args.config, args.ckpt_path, args.num_images, args.score_thr, overrides)
    out = draw_summary(history, images, args.out, title=f"{args.config}  ({args.ckpt_path})")
    print(f"summary picture: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
