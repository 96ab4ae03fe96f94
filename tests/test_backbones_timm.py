"""TimmBackbone: mmdet ResNet checkpoint layout and numbers, DCN, frozen stages, and the entry's backbones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from htc_lightning.models.backbones import DeformConv2dPack, TimmBackbone
from htc_lightning.tools.compare import assert_close_to_reference

FIXTURES = Path(__file__).parent / "fixtures"
ORACLE = FIXTURES / "oracle" / "tiny_htc_s0.pt"
# mmdet 3.3.0's ResNet(depth=18, base_channels=16) run on the oracle input with the oracle's weights, eval mode
RESNET18_OUTPUTS = FIXTURES / "backbones" / "tiny_htc_s0_resnet18_outputs.pt"
# state-dict keys (and shapes) of mmdet 3.3.0's ResNet(depth=50) and ResNeXt(depth=101, groups=32, base_width=8)
MMDET_KEYS = FIXTURES / "backbones" / "mmdet_resnet_keys.json"

TINY = {"channels": (16, 32, 64, 128), "stem_width": 16}  # the oracle's --tiny ResNet-18


def _oracle_backbone_state() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    dump = torch.load(ORACLE, weights_only=False)
    state = {k[len("backbone."):]: v for k, v in dump["state_dict"].items() if k.startswith("backbone.")}
    return dump["inputs"], state


def test_resnet50_keys_equal_mmdet_resnet50():
    mmdet_keys = json.loads(MMDET_KEYS.read_text())["resnet50"]
    assert sorted(TimmBackbone("resnet50").state_dict()) == sorted(mmdet_keys)


def test_resnext101_32x8d_keys_and_shapes_equal_mmdet():
    mmdet_shapes = {k: tuple(v) for k, v in json.loads(MMDET_KEYS.read_text())["resnext101_32x8d"].items()}
    ours = {k: tuple(v.shape) for k, v in TimmBackbone("resnext101_32x8d").state_dict().items()}
    assert ours == mmdet_shapes


@pytest.mark.reference
def test_tiny_resnet18_builds_the_oracle_shapes():
    _, state = _oracle_backbone_state()
    ours = {k: tuple(v.shape) for k, v in TimmBackbone("resnet18", model_kwargs=TINY).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.reference
def test_tiny_resnet18_reproduces_mmdet_backbone_outputs():
    inputs, state = _oracle_backbone_state()
    expected = torch.load(RESNET18_OUTPUTS, weights_only=True)["outputs"]
    backbone = TimmBackbone("resnet18", model_kwargs=TINY)
    backbone.load_state_dict(state, strict=True)
    with torch.no_grad():
        outs = backbone.eval()(inputs)
    assert backbone.out_channels == [16, 32, 64, 128] and backbone.strides == [4, 8, 16, 32]
    for level, (out, ref) in enumerate(zip(outs, expected, strict=True)):
        assert_close_to_reference(out, ref, msg=f"C{level + 2}")


@pytest.mark.reference
def test_weights_file_of_a_whole_mmdet_detector_loads_its_backbone(tmp_path):
    inputs, state = _oracle_backbone_state()
    dump = torch.load(ORACLE, weights_only=False)
    path = tmp_path / "htc_tiny.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": dump["state_dict"]}, path)
    expected = torch.load(RESNET18_OUTPUTS, weights_only=True)["outputs"]
    backbone = TimmBackbone("resnet18", weights=str(path), model_kwargs=TINY).eval()
    with torch.no_grad():
        assert_close_to_reference(backbone(inputs)[-1], expected[-1], msg="C5")


@pytest.mark.reference
def test_weights_file_missing_backbone_entries_is_an_error(tmp_path):
    _, state = _oracle_backbone_state()
    state.pop("layer3.0.conv1.weight")
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(KeyError, match="layer3.0.conv1.weight"):
        TimmBackbone("resnet18", weights=str(path), model_kwargs=TINY)


def test_dcn_stages_use_mmdet_deform_conv_keys():
    backbone = TimmBackbone("resnet50", dcn_stages=(2, 3, 4))
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer2.0.conv2.conv_offset.weight"] == (18, 128, 3, 3)  # deform_groups * 2 * 3 * 3
    assert shapes["layer4.2.conv2.conv_offset.bias"] == (18,)
    assert not any(k.startswith("layer1.") and "conv_offset" in k for k in shapes)
    assert isinstance(backbone.layer3[5].conv2, DeformConv2dPack) and backbone.layer3[5].conv2.stride == (1, 1)
    assert backbone.layer3[0].conv2.stride == (2, 2)  # pytorch style: the stride sits on the 3x3


def test_deform_conv_with_zero_offsets_equals_the_plain_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
    x = torch.randn(2, 8, 11, 13)
    torch.testing.assert_close(DeformConv2dPack.from_conv(conv)(x), conv(x), atol=1e-5, rtol=0)


def test_deform_conv_offsets_are_dy_dx_pairs():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    dcn = DeformConv2dPack.from_conv(conv)
    with torch.no_grad():
        dcn.conv_offset.bias.view(9, 2)[:, 1] = 1.0  # every tap samples one pixel to the right
    x = torch.randn(1, 3, 7, 9)
    # output column j now equals the plain conv's column j + 1
    torch.testing.assert_close(dcn(x)[..., :-1], conv(x)[..., 1:], atol=1e-5, rtol=0)


def test_dcn_backbone_from_plain_weights_equals_the_plain_backbone():
    kwargs = {"channels": (8, 16, 32, 64), "stem_width": 8}
    plain = TimmBackbone("resnet50", model_kwargs=kwargs).eval()
    dcn = TimmBackbone("resnet50", model_kwargs=kwargs, dcn_stages=(2, 3, 4)).eval()
    result = dcn.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all("conv_offset" in k for k in result.missing_keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(dcn(x), plain(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_legacy_mmdet_v1_dcn_offset_keys_load(tmp_path):
    kwargs = {"channels": (8, 16, 32, 64), "stem_width": 8}
    source = TimmBackbone("resnet50", model_kwargs=kwargs, dcn_stages=(4,))
    with torch.no_grad():
        source.layer4[0].conv2.conv_offset.bias.fill_(0.25)
    legacy = {k.replace("conv2.conv_offset.", "conv2_offset."): v for k, v in source.state_dict().items()}
    path = tmp_path / "v1.pth"
    torch.save({"state_dict": legacy}, path)
    loaded = TimmBackbone("resnet50", model_kwargs=kwargs, dcn_stages=(4,), weights=str(path))
    assert torch.equal(loaded.layer4[0].conv2.conv_offset.bias, torch.full((18,), 0.25))


def test_dcn_on_a_stage_without_bottleneck_conv2_is_an_error():
    with pytest.raises(ValueError, match="dcn_stages has 0"):
        TimmBackbone("resnet18", model_kwargs=TINY, dcn_stages=(0,))


def test_norm_eval_and_frozen_stages_follow_mmdet():
    backbone = TimmBackbone("resnet18", model_kwargs=TINY, frozen_stages=1, norm_eval=True).train()
    assert all(not m.training for m in backbone.modules() if isinstance(m, _BatchNorm))
    frozen = {n.split(".")[0] for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert all(p.requires_grad for n, p in backbone.named_parameters() if n.startswith(("layer2", "layer4")))
    stats = backbone.layer3[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64)).pop().sum().backward()
    assert torch.equal(backbone.layer3[0].bn1.running_mean, stats)


def test_without_norm_eval_unfrozen_batchnorms_train():
    backbone = TimmBackbone("resnet18", model_kwargs=TINY, frozen_stages=0, norm_eval=False).train()
    assert not backbone.bn1.training and not backbone.conv1.weight.requires_grad
    assert backbone.layer1[0].bn1.training and backbone.layer1[0].conv1.weight.requires_grad


def test_frozen_stages_minus_one_freezes_nothing():
    backbone = TimmBackbone("resnet18", model_kwargs=TINY, frozen_stages=-1)
    assert all(p.requires_grad for p in backbone.parameters())


def _forward_backward(backbone: TimmBackbone, size: int = 64) -> list[torch.Tensor]:
    outs = backbone.train()(torch.randn(1, 3, size, size))
    sum(o.float().mean() for o in outs).backward()
    return outs


@pytest.mark.parametrize(("model_name", "channels", "dcn"), [
    ("resnet50", [256, 512, 1024, 2048], (2, 3, 4)),
    ("resnet101", [256, 512, 1024, 2048], ()),
])
def test_resnets_build_and_train_at_strides_4_to_32(model_name, channels, dcn):
    backbone = TimmBackbone(model_name, dcn_stages=dcn)
    outs = _forward_backward(backbone)
    assert backbone.out_channels == channels and backbone.strides == [4, 8, 16, 32]
    assert [o.shape[1] for o in outs] == channels
    assert [64 // o.shape[-1] for o in outs] == [4, 8, 16, 32]
    assert backbone.layer4[0].conv2.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize(("model_name", "channels"), [
    ("resnext101_32x8d", [256, 512, 1024, 2048]),
    ("resnext101_64x4d", [256, 512, 1024, 2048]),
    ("legacy_senet154", [256, 512, 1024, 2048]),
    ("dpn107", [376, 1152, 2432, 2688]),
])
def test_large_backbones_build_and_train_at_strides_4_to_32(model_name, channels):
    backbone = TimmBackbone(model_name, frozen_stages=-1)
    outs = _forward_backward(backbone)
    assert backbone.out_channels == channels and backbone.strides == [4, 8, 16, 32]
    assert [o.shape[1] for o in outs] == channels
    assert [64 // o.shape[-1] for o in outs] == [4, 8, 16, 32]
    assert all(p.grad is not None for p in backbone.stage_modules(0).__next__().parameters())
