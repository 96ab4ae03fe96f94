"""``python -m htc_lightning.tools.flops``: FLOPs counted by PyTorch, per part, not 0, and what the layers' shapes
say they are."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from htc_lightning.tools.flops import count_flops, main

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny" / "htc_tiny_synthetic.yaml")


def test_every_part_has_flops_and_they_add_up_to_the_total():
    result = count_flops(CONFIG, (64, 96), num_classes=6)
    assert set(result["parts"]) == {"backbone", "neck", "rpn_head", "roi_head"}
    assert all(flops > 0 for flops in result["parts"].values())
    assert sum(result["parts"].values()) == result["total"]
    assert result["padded"] == (64, 96)


def test_the_neck_costs_what_its_convolutions_shapes_say():
    from htc_lightning.predictor import build_from_config

    module, _ = build_from_config(CONFIG, [{"id": i, "name": str(i)} for i in range(6)])
    neck, backbone = module.detector.neck, module.detector.backbone
    expected = []

    def conv_flops(conv: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        kh, kw = conv.kernel_size
        # one multiply-add (2 FLOPs) per weight of the kernel per output pixel and channel
        expected.append(2 * (conv.in_channels // conv.groups) * kh * kw * output.numel())

    hooks = [m.register_forward_hook(conv_flops) for m in neck.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        neck(backbone(torch.randn(1, 3, 64, 96)))
    for h in hooks:
        h.remove()
    # the element-wise additions and the upsampling of the top-down path are not counted (nor by mmcv or fvcore)
    assert count_flops(CONFIG, (64, 96), num_classes=6)["parts"]["neck"] == sum(expected)


def test_the_backbone_cost_grows_with_the_pixels(capsys):
    small = count_flops(CONFIG, (64, 64), num_classes=6)["parts"]["backbone"]
    large = count_flops(CONFIG, (128, 128), num_classes=6)["parts"]["backbone"]
    assert large == 4 * small  # convolutions: FLOPs proportional to output pixels, exactly at sizes divisible by 32
    main(["--config", CONFIG, "--size", "64", "64", "--num-classes", "6"])
    out = capsys.readouterr().out
    assert "| backbone |" in out and "**total**" in out
