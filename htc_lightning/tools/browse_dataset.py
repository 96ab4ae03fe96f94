"""Draw a dataset's ground truth, as annotated or as the model receives it.

    python -m htc_lightning.tools.browse_dataset --config configs/htc/htc-without-semantic_r50_fpn_1x_coco.yaml \\
        --data-root data/coco --out outputs/browse --num 20 [--after-transforms] [--split val]

writes ``<out>/<image file stem>.png``. Without ``--after-transforms``: the image file with its annotations
(boxes, masks, class names; crowd regions in grey). With it: what a training batch holds, built by the config's
own datamodule and loader (resize, flip, normalisation undone for display, padding kept, the semantic map when
loaded as an overlay), in the order and with the augmentations epoch ``--epoch`` draws, each picture titled with
its size, scale and flip. Crowd boxes are drawn grey, objects in their class colour.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, SEMANTIC_IGNORE
from ..structures import Detections
from ..visualize import draw_detections, label_color

GREY = (160, 160, 160)


def datamodule_from_config(config: str | Path, data_root: str | None = None):
    """The config's ``data`` section built as LightningCLI builds it (its ``class_path`` and ``init_args``)."""
    import pytorch_lightning as pl
    from pytorch_lightning.cli import instantiate_module

    parsed = yaml.safe_load(Path(config).read_text()) or {}
    data = parsed.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{config} has no 'data: {{class_path: ..., init_args: ...}}' section")
    init = dict(data.get("init_args") or {})
    if data_root is not None:
        init["data_root"] = data_root
    init["num_workers"] = 0
    return instantiate_module(pl.LightningDataModule, {"_class_path": data["class_path"], **init})


def draw_target(image: Image.Image, target: dict, class_names: list[str]) -> Image.Image:
    """``target``'s objects (boxes, masks, names) and crowd boxes (grey) on ``image`` (same frame)."""
    boxes, labels = target["boxes"], target["labels"]
    masks = target.get("masks")
    if masks is not None:
        masks = masks[:, :image.height, :image.width].bool()
    objects = Detections(boxes, torch.ones(len(boxes)), labels, masks)
    drawn = draw_detections(image, objects, class_names=class_names, score_thr=0.0, show_scores=False)
    crowd = target.get("crowd_boxes", torch.zeros(0, 4)).float()
    if len(crowd) == 0:
        return drawn
    return to_pil_image(draw_bounding_boxes(pil_to_tensor(drawn), crowd, labels=["crowd"] * len(crowd), colors=GREY,
                                            width=2))


def _batch_picture(image: torch.Tensor, target: dict, mean, std) -> Image.Image:
    """A normalised batch image shown as the network sees it: padded, resized, flipped; semantic map overlaid."""
    pixels = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    pixels = pixels.clamp(0, 255).round().byte()
    if "semantic" in target:
        semantic = target["semantic"]
        values = [v for v in semantic.unique().tolist() if v != SEMANTIC_IGNORE]
        if values:
            masks = semantic == torch.tensor(values).view(-1, 1, 1)
            pixels = draw_segmentation_masks(pixels, masks, alpha=0.4, colors=[label_color(v + 91) for v in values])
    return to_pil_image(pixels)


def _title(picture: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (picture.width, picture.height + 14), (255, 255, 255))
    out.paste(picture, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill=(0, 0, 0), font=ImageFont.load_default())
    return out


def browse(config: str, out: str, num: int = 10, after_transforms: bool = False, split: str = "train",
           data_root: str | None = None, epoch: int = 0) -> list[Path]:
    dm = datamodule_from_config(config, data_root)
    dm.setup("fit" if split in ("train", "val") else "test")
    dataset = {"train": dm.train_dataset, "val": dm.val_dataset, "test": getattr(dm, "test_dataset", None)}[split]
    names = list(dm.class_names)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if not after_transforms:
        for index in range(min(num, len(dataset))):
            image, target = dataset.load(index)
            picture = Image.fromarray(image.permute(1, 2, 0).numpy())
            path = out_dir / f"{Path(target['meta']['file_name']).stem}.png"
            draw_target(picture, target, names).save(path)
            written.append(path)
        return written
    loader = dm.train_dataloader() if split == "train" else (dm.val_dataloader() if split == "val"
                                                              else dm.test_dataloader())
    if split == "train" and hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)
    mean, std = getattr(dm, "mean", IMAGENET_MEAN), getattr(dm, "std", IMAGENET_STD)
    for images, targets in loader:
        for image, target in zip(images, targets):
            if len(written) >= num:
                return written
            meta = target["meta"]
            picture = draw_target(_batch_picture(image, target, mean, std), target, names)
            h, w = meta["img_size"]
            sx, sy = meta["scale_factor"]
            text = (f"{meta.get('file_name')} {w}x{h} (padded {meta['pad_size'][1]}x{meta['pad_size'][0]}) "
                    f"scale {sx:.3f} flip {meta['flip']}")
            path = out_dir / f"{len(written):03d}_{Path(str(meta.get('file_name'))).stem}.png"
            _title(picture, text).save(path)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="an htc-lightning YAML config (its data section is used)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=10, help="how many images to draw")
    parser.add_argument("--after-transforms", action="store_true", help="draw the batches the model receives")
    parser.add_argument("--split", choices=["train", "val", "test"], default="train")
    parser.add_argument("--data-root", default=None, help="overrides the config's data_root")
    parser.add_argument("--epoch", type=int, default=0, help="the training epoch whose order and augmentations "
                                                               "to draw (--after-transforms)")
    args = parser.parse_args(argv)
    for path in browse(args.config, args.out, args.num, args.after_transforms, args.split, args.data_root,
                       args.epoch):
        print(path)


if __name__ == "__main__":
    main()
