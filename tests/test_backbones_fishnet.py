"""FishNet: the authors' parameter counts and outputs (reference dumps of their code), checkpoint loading, and the
detection interface."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from htc_lightning.models.backbones import FishNet, convert_fishnet_state_dict
from htc_lightning.tools.compare import assert_close_to_reference

# The authors' network (kevin-ssy/FishNet) at 1/8 width, 125 classes, random weights and BN statistics:
# their state_dict, an input, and the stem / ten stage / logit outputs in eval mode.
DUMPS = Path(__file__).parent / "fixtures" / "fishnet"
DUMP_NAMES = ["fishnet99_w8_s1.pt", "fishnet150_w8_s2.pt"]


def _load_dump(name: str) -> dict:
    return torch.load(DUMPS / name, weights_only=False)


def _tiny_from_dump(dump: dict, **kwargs) -> FishNet:
    return FishNet(depth=None, num_res_blks=dump["num_res_blks"], num_trans_blks=dump["num_trans_blks"],
                   network_planes=dump["network_planes"], num_classes=125, **kwargs)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "expected"), [(99, 16_628_904), (150, 24_959_400), (201, 44_584_552)])
def test_parameter_count_with_imagenet_head_matches_the_authors(depth, expected):
    assert _num_params(FishNet(depth, num_classes=1000, out_indices=())) == expected


def test_fishnet99_parameter_counts_without_the_classifier_match_the_authors():
    model = FishNet(99, num_classes=1000, out_indices=())
    assert _num_params(model) - _num_params(model.classifier["fc"]) == 15_571_904
    assert _num_params(FishNet(99, out_bn_relu=False)) == 13_335_296  # no score block at all


@pytest.mark.reference
@pytest.mark.parametrize("name", DUMP_NAMES)
def test_reference_stages_and_logits_are_reproduced(name, device):
    dump = _load_dump(name)
    model = _tiny_from_dump(dump, out_indices=())
    assert _num_params(model) == dump["num_params"]
    model.load_state_dict(convert_fishnet_state_dict(dump["state_dict"]), strict=True)
    with torch.no_grad():
        stem, stages, logits = model.eval().to(device).forward_stages(dump["input"].to(device))
    # random-weight activations grow to 1e6 through the stages: each is compared at its own scale
    assert_close_to_reference(stem, dump["stem"], msg="stem")
    assert len(stages) == 10
    for i, (ours, ref) in enumerate(zip(stages, dump["stages"], strict=True)):
        assert_close_to_reference(ours, ref, msg=f"stage {i}")
    assert_close_to_reference(logits, dump["logits"], msg="logits")


@pytest.mark.reference
def test_released_checkpoint_layout_loads(tmp_path):
    dump = _load_dump("fishnet99_w8_s1.pt")
    # the release .tar: DataParallel's ``module.`` prefix inside a training-state dict
    release = {"epoch": 100, "arch": "fishnet99", "best_prec1": np.float64(77.41),
               "state_dict": {f"module.{k}": v for k, v in dump["state_dict"].items()},
               "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(release, path)
    model = _tiny_from_dump(dump, out_indices=(), weights=str(path)).eval()
    with torch.no_grad():
        assert_close_to_reference(model(dump["input"]), dump["logits"], msg="logits")


@pytest.mark.reference
def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    dump = _load_dump("fishnet99_w8_s1.pt")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": dump["state_dict"], "extra": pickle.PicklingError("x")}, path)
    with pytest.raises(RuntimeError, match="safe allowlist"):
        _tiny_from_dump(dump, weights=str(path))


@pytest.mark.reference
def test_checkpoint_of_another_depth_is_an_error(tmp_path):
    dump = _load_dump("fishnet150_w8_s2.pt")
    path = tmp_path / "fishnet150.pth"
    torch.save({"state_dict": dump["state_dict"]}, path)
    with pytest.raises(KeyError, match="FishNet-99"):
        FishNet(99, width_divisor=8, weights=str(path))


@pytest.mark.reference
def test_detection_backbone_keeps_classifier_free_and_accepts_imagenet_weights(tmp_path):
    dump = _load_dump("fishnet150_w8_s2.pt")
    path = tmp_path / "fishnet150.pth"
    torch.save(dump["state_dict"], path)
    model = FishNet(150, width_divisor=8, weights=str(path), out_bn_relu=False).eval()
    assert model.classifier is None
    with torch.no_grad():
        outs = model(dump["input"])
    for i, (ours, ref) in enumerate(zip(outs, dump["stages"][6:], strict=True)):
        assert_close_to_reference(ours, ref, msg=f"stage {6 + i}")


@pytest.mark.parametrize("size", [(240, 256), (256, 257)])
def test_input_not_a_multiple_of_32_is_refused_with_its_size(size):
    model = FishNet(99, width_divisor=8)
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        model(torch.randn(1, 3, *size))


def test_full_width_detection_outputs_are_the_documented_stages():
    model = FishNet(150)
    assert model.out_channels == [320, 832, 1600, 2112]
    assert model.strides == [4, 8, 16, 32]
    assert model.stage_channels == [128, 256, 512, 512, 768, 512, 320, 832, 1600, 2112]


def test_detection_outputs_have_announced_channels_and_strides_and_are_normalised():
    model = FishNet(99, width_divisor=8, out_indices=(5, 6, 7, 8, 9)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == model.out_channels == [64, 40, 104, 200, 264]
    assert [64 // o.shape[-2] for o in outs] == [96 // o.shape[-1] for o in outs] == model.strides == [8, 4, 8, 16, 32]
    assert all(o.min() >= 0 for o in outs)  # the BN-ReLU of out_bn_relu


def test_frozen_stages_and_norm_eval():
    model = FishNet(99, width_divisor=8, frozen_stages=2, norm_eval=True).train()
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("conv1.") for n in frozen) and any(n.startswith("tail.1.") for n in frozen)
    assert not any(n.startswith(("tail.2.", "bridge.", "body.", "head.", "out_norms.")) for n in frozen)
    outs = model(torch.randn(1, 3, 64, 64))
    sum(o.mean() for o in outs).backward()
    assert model.head[2].blocks[0].conv1.weight.grad is not None and model.tail[0][0].conv1.weight.grad is None


def test_batchnorms_train_without_norm_eval():
    model = FishNet(99, width_divisor=8).train()
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_depth_is_refused():
    with pytest.raises(ValueError, match="188"):
        FishNet(188)
