"""FLOPs and parameters of a config's detector at a given input size, per part, counted by PyTorch itself
(``torch.utils.flop_counter.FlopCounterMode``: every matrix multiply and convolution the inference runs).

    python -m htc_lightning.tools.flops --config configs/htc/htc_r50_fpn_1x_coco.yaml --size 800 1333

The image is fed at exactly ``--size`` (h, w; padded to the datamodule's ``size_divisor``), as mmdetection's
``get_flops.py --shape`` does. Not counted: torchvision's custom kernels (RoIAlign, NMS, deformable convolution)
and element-wise ops, as in mmcv's and fvcore's counters. The RoI heads' share depends on how many proposals and
detections the (random-weight) model makes: the table says how many there were.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..predictor import COCO_CATEGORIES, build_from_config

PARTS = ("backbone", "neck", "rpn_head", "roi_head")


def count_flops(config: str | Path, size: tuple[int, int], num_classes: int = 80, seed: int = 0) -> dict:
    """``{"total", "parts": {name: flops}, "params": {name: count}, "detections", "input"}`` for one image."""
    categories = COCO_CATEGORIES if num_classes == 80 else [{"id": i + 1, "name": str(i + 1)}
                                                            for i in range(num_classes)]
    module, datamodule = build_from_config(config, categories)
    detector = module.detector.eval()
    h, w = size
    divisor = int(getattr(datamodule, "size_divisor", 32))
    pad = (-(-h // divisor) * divisor, -(-w // divisor) * divisor)
    images = torch.zeros(1, 3, *pad)
    images[:, :, :h, :w] = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    meta = {"image_id": 0, "orig_size": (h, w), "img_size": (h, w), "pad_size": pad, "scale_factor": (1.0, 1.0),
            "flip": False}
    counter = FlopCounterMode(display=False)
    parts: dict[str, int] = {}
    started: dict[str, int] = {}
    handles = []
    # The parts called as modules (backbone, neck, RPN) are measured by the counter's total before and after their
    # forward; the RoI head (called by its predict method) and the proposal decoding get the rest.
    for name in PARTS[:3]:
        child = getattr(detector, name, None)
        if child is not None:
            handles.append(child.register_forward_pre_hook(
                lambda _m, _a, name=name: started.__setitem__(name, counter.get_total_flops())))
            handles.append(child.register_forward_hook(
                lambda _m, _a, _o, name=name: parts.__setitem__(
                    name, parts.get(name, 0) + counter.get_total_flops() - started[name])))
    try:
        with torch.inference_mode(), counter:
            detections = detector.predict(images, [meta])
    finally:
        for handle in handles:
            handle.remove()
    if getattr(detector, "roi_head", None) is not None:
        parts["roi_head"] = counter.get_total_flops() - sum(parts.values())
    params = {name: sum(p.numel() for p in getattr(detector, name).parameters())
              for name in PARTS if getattr(detector, name, None) is not None}
    return {"total": counter.get_total_flops(), "parts": parts, "params": params,
            "all_params": sum(p.numel() for p in detector.parameters()), "detections": len(detections[0]),
            "input": (h, w), "padded": pad}


def format_table(result: dict, config: str) -> str:
    h, w = result["input"]
    rows = [f"{config} at {h}x{w} (padded {result['padded'][0]}x{result['padded'][1]}), 1 image, inference",
            "", "| part | GFLOPs | parameters (M) |", "|---|---|---|"]
    for name, flops in result["parts"].items():
        shown = "roi_head (+ proposal decoding)" if name == "roi_head" else name
        rows.append(f"| {shown} | {flops / 1e9:.2f} | {result['params'].get(name, 0) / 1e6:.2f} |")
    rows.append(f"| **total** | **{result['total'] / 1e9:.2f}** | **{result['all_params'] / 1e6:.2f}** |")
    rows += ["", f"({result['detections']} detections kept by the random-weight model; GFLOPs count a multiply-add "
                 "as 2 FLOPs, PyTorch's convention; mmcv's and fvcore's tables print half of that as 'GFLOPs')"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="an htc-lightning YAML config (its model section)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                        help="input height and width (default 800 1333)")
    parser.add_argument("--num-classes", type=int, default=80)
    args = parser.parse_args(argv)
    print(format_table(count_flops(args.config, tuple(args.size), args.num_classes), args.config))


if __name__ == "__main__":
    main()
