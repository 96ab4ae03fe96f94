"""Stock ImageNet backbones from timm (ResNet, ResNeXt, SENet, DPN), optionally with deformable 3×3 convolutions.

The timm feature extractor's layers are registered directly on this module, so its state-dict keys are timm's
layer names without a wrapper prefix. For ResNet/ResNeXt those are torchvision's names, which are also mmdet's
``ResNet`` names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``): an mmdet checkpoint's
``backbone.*`` keys load unchanged (pytorch style, stride on the 3×3 convolution, as in both libraries).

Stage indices follow timm's ``feature_info``: 0 is the stride-2 stem, 1..4 are the stride 4..32 stages (C2..C5),
so the defaults ``out_indices=(1, 2, 3, 4)``, ``frozen_stages=1`` and ``dcn_stages=(2, 3, 4)`` mean what mmdet's
``out_indices=(0, 1, 2, 3)``, ``frozen_stages=1`` and ``stage_with_dcn=(False, True, True, True)`` mean.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import timm
import torch
from torch import Tensor, nn

from htc_lightning.models.backbones.dcn import DeformConv2dPack
from htc_lightning.models.backbones.freezing import apply_freezing

# Classifier weights of full ImageNet checkpoints; a feature extractor has no use for them.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "last_linear.", "head.")


class TimmBackbone(nn.Module):
    """A timm model as a detection backbone: ``forward(images) -> [C_i for i in out_indices]``.

    Args:
        model_name: timm architecture, e.g. ``resnet50``, ``resnext101_32x8d``, ``resnext101_64x4d``,
            ``legacy_senet154`` (the Caffe-ported SENet-154 of the paper; ``senet154`` is timm's own variant),
            ``dpn107``.
        pretrained: ``true``: timm fetches its ImageNet weights (from the Hugging Face hub, or its local cache;
            see the README, "Weights on a cluster without internet"); ``false``: random initialisation; a path:
            the local file is loaded as ``weights`` is, with a printed report of what matched. A failed download is
            a :class:`PretrainedWeightsError` naming both ways out.
        weights: a local checkpoint (timm/torchvision ImageNet file, or an mmdet detector checkpoint whose
            ``backbone.*`` entries are used), read with ``torch.load(weights_only=True)`` (``.safetensors`` too).
        out_indices: timm feature indices to return (1..4 = strides 4..32).
        frozen_stages: stages ``0..frozen_stages`` get ``requires_grad=False`` and stay in eval mode
            (0 = the stem only, -1 = nothing frozen), as mmdet's ``frozen_stages`` (whose stage i is our i + 1).
        norm_eval: keep every BatchNorm in eval mode during training (mmdet's ``norm_eval``; the detection batch
            of 2 images/GPU is too small for batch statistics).
        dcn_stages: stages whose bottlenecks get a deformable ``conv2`` (mmdet's ``dconv_c3-c5`` = ``(2, 3, 4)``).
        model_kwargs: passed to ``timm.create_model``. ``stem_width`` also narrows the plain 7×7 stem of a ResNet
            (timm fixes it at 64), which the tiny test models use (``channels=(16, 32, 64, 128), stem_width=16``).
    """

    def __init__(self, model_name: str = "resnet50", pretrained: bool | str = False, weights: str | None = None,
                 out_indices: tuple[int, ...] = (1, 2, 3, 4), frozen_stages: int = 1, norm_eval: bool = True,
                 dcn_stages: tuple[int, ...] = (), model_kwargs: dict | None = None) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if isinstance(pretrained, str):
            if weights is not None:
                raise ValueError(f"TimmBackbone({model_name!r}): pretrained={pretrained!r} and weights={weights!r} "
                                 "are both files; give one")
            weights, pretrained = pretrained, False
        try:
            features = timm.create_model(model_name, pretrained=pretrained, features_only=True,
                                         out_indices=tuple(out_indices), **kwargs)
        except OSError as e:  # offline: huggingface_hub's and urllib's errors are all OSErrors
            if not pretrained:
                raise
            raise PretrainedWeightsError.download_failed(f"TimmBackbone({model_name!r})", e) from e
        info = [dict(entry) for entry in features.feature_info.info]
        if "stem_width" in kwargs:
            _narrow_plain_stem(features, int(kwargs["stem_width"]), info)
        self.model_name = model_name
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._concat = bool(getattr(features, "concat", False))
        self._return_layers: dict[str, int] = {name: int(i) for name, i in features.return_layers.items()}
        # Register timm's layers on self, keeping its order: keys become ``conv1.weight``, ``layer1.0...``
        self._layer_names: list[str] = []
        for name, module in features.items():
            self.add_module(name, module)
            self._layer_names.append(name)
        self._stage_of = _stage_assignment(self._layer_names, info, model_name)
        chans = [info[i]["num_chs"] for i in self.out_indices]
        self.out_channels: list[int] = [sum(c) if isinstance(c, (tuple, list)) else int(c) for c in chans]
        self.strides: list[int] = [int(info[i]["reduction"]) for i in self.out_indices]
        self.dcn_stages = tuple(dcn_stages)
        for stage in self.dcn_stages:
            self._make_stage_deformable(stage)
        if weights is not None:
            self.load_weights(weights)
        self.train(self.training)  # apply frozen_stages now, not only at the first .train()

    # ------------------------------------------------------------------ structure
    def stage_modules(self, stage: int) -> Iterator[nn.Module]:
        """The top-level layers of feature stage ``stage`` (0 = stem)."""
        for name in self._layer_names:
            if self._stage_of[name] == stage:
                yield getattr(self, name)

    def _make_stage_deformable(self, stage: int) -> None:
        replaced = 0
        for layer in self.stage_modules(stage):
            for block in layer.modules():
                conv = getattr(block, "conv2", None)
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    block.conv2 = DeformConv2dPack.from_conv(conv)
                    replaced += 1
        if not replaced:
            raise ValueError(f"TimmBackbone({self.model_name!r}): dcn_stages has {stage}, but that stage has no "
                             f"bottleneck with a 3x3 'conv2' to make deformable")

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        frozen = [m for stage in range(self.frozen_stages + 1) for m in self.stage_modules(stage)]
        apply_freezing(self, frozen, self.norm_eval, mode)
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> list[Tensor]:
        outs: dict[int, Tensor] = {}
        x = images
        for name in self._layer_names:
            x = getattr(self, name)(x)
            if name in self._return_layers:
                # DPN's blocks return (residual, dense) pairs; timm's feature API concatenates them
                y = (torch.cat(x, 1) if self._concat else x[0]) if isinstance(x, (tuple, list)) else x
                outs[self._return_layers[name]] = y
        return [outs[i] for i in self.out_indices]

    # ------------------------------------------------------------------ weights
    def load_weights(self, path: str) -> None:
        """Load a local checkpoint (see the class docstring); missing keys other than the zero-initialised DCN
        offsets are an error, classifier keys are ignored."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TimmBackbone({self.model_name!r}): weights file {path} does not exist")
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            ckpt = load_file(path)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = _unwrap_state_dict(ckpt, path)
        own = self.state_dict()
        converted: dict[str, Tensor] = {}
        for key, value in state.items():
            key = _to_own_key(key, own)
            if key is not None:
                converted[key] = value
        result = self.load_state_dict(converted, strict=False)
        missing = [k for k in result.missing_keys if ".conv_offset." not in k and not k.endswith("num_batches_tracked")]
        if missing:
            raise KeyError(f"TimmBackbone({self.model_name!r}): {path} lacks {len(missing)} weights, "
                           f"e.g. {missing[:5]}")
        unexpected = [k for k in result.unexpected_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
        if unexpected:
            warnings.warn(f"TimmBackbone({self.model_name!r}): ignored {len(unexpected)} entries of {path}, "
                          f"e.g. {unexpected[:5]}", stacklevel=2)
        offsets = [k for k in result.missing_keys if ".conv_offset." in k]
        classifier = len(result.unexpected_keys) - len(unexpected)
        print(f"TimmBackbone({self.model_name!r}): loaded {len(converted) - len(result.unexpected_keys)} of "
              f"{len(own)} tensors from {path}" + (f"; {len(offsets)} DCN offset tensors keep their zero "
                                                   "initialisation" if offsets else "")
              + (f"; {classifier} classifier entries ignored" if classifier else "")
              + (f"; {len(unexpected)} other entries ignored" if unexpected else ""), flush=True)


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights could not be fetched (no internet, no cache); the first line names the way out."""

    last: PretrainedWeightsError | None = None  # the CLI re-raises it in place of jsonargparse's union message

    def __init__(self, message: str) -> None:
        super().__init__(message)
        PretrainedWeightsError.last = self

    @classmethod
    def download_failed(cls, who: str, error: BaseException) -> PretrainedWeightsError:
        return cls(f"{who}: cannot download the pretrained ImageNet weights (offline?). Either set pretrained to a "
                   "local weights file (pretrained: /path/to/weights.pth or .safetensors; README: \"Weights on a "
                   "cluster without internet\"), or pretrained: false to train from random initialisation.\n"
                   f"The download failed with {type(error).__name__}: {str(error).strip().splitlines()[0]}")


def _unwrap_state_dict(ckpt: object, path: object) -> dict[str, Tensor]:
    state = ckpt
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state dict, got {type(state).__name__}")
    if any(k.startswith("backbone.") for k in state):  # a whole mmdet detector
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _to_own_key(key: str, own: dict[str, Tensor]) -> str | None:
    if key in own:
        return key
    # mmdet 1.x put the offset branch beside the conv: ``conv2_offset.*`` for ``conv2.conv_offset.*``
    head, _, leaf = key.rpartition(".")
    if head.endswith("_offset"):
        legacy = f"{head[:-len('_offset')]}.conv_offset.{leaf}"
        if legacy in own:
            return legacy
    # timm's feature extractors flatten nested sequentials (DPN: ``features.conv1_1`` -> ``features_conv1_1``)
    flat = key.replace(".", "_", 1)
    if flat in own:
        return flat
    return key  # reported as unexpected unless it is a classifier entry


def _stage_assignment(layer_names: list[str], info: list[dict], model_name: str) -> dict[str, int]:
    """Map each top-level layer to its feature stage: a stage ends at the layer timm taps for that feature."""
    taps = [entry["module"].replace(".", "_") for entry in info]
    stage_of: dict[str, int] = {}
    stage = 0
    for name in layer_names:
        stage_of[name] = stage
        if stage < len(taps) and name == taps[stage]:
            stage += 1
    if stage == 0:
        raise ValueError(f"TimmBackbone({model_name!r}): cannot find timm's feature taps {taps} among {layer_names}")
    return stage_of


def _narrow_plain_stem(features: nn.Module, width: int, info: list[dict]) -> None:
    """Rebuild a ResNet's single 7×7 stem at ``width`` channels (timm hard-codes 64 unless the stem is deep).

    The first block of ``layer1`` then takes ``width`` inputs; its projection shortcut disappears when the
    widths agree, as in mmdet's ResNet with ``base_channels=width``."""
    conv1 = getattr(features, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or conv1.kernel_size != (7, 7) or conv1.out_channels == width:
        return
    features.conv1 = _conv_like(conv1, in_channels=conv1.in_channels, out_channels=width)
    features.bn1 = type(features.bn1)(width)
    block = features.layer1[0]
    block.conv1 = _conv_like(block.conv1, in_channels=width)
    if block.downsample is not None:
        proj = block.downsample[0]
        if proj.out_channels == width and proj.stride == (1, 1):
            block.downsample = None
        else:
            block.downsample[0] = _conv_like(proj, in_channels=width)
    info[0]["num_chs"] = width


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(in_channels, conv.out_channels if out_channels is None else out_channels, conv.kernel_size,
                     stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None)
