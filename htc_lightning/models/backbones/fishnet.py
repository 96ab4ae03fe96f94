"""FishNet (Sun et al., "FishNet: A Versatile Backbone for Image, Region, and Pixel Level Prediction", NeurIPS 2018).

A pre-activation bottleneck network in three parts: the *tail* down-samples like a ResNet (stages 0-2, stride
8..32), a *bridge* at stride 32 (stage 3), the *body* up-samples back to stride 4 (stages 4-6) and the *head*
down-samples again (stages 7-9); every body and head stage concatenates a *transfer* of an earlier feature of
its output resolution (paper Sec. 3). Loads the authors' released checkpoints through
:func:`convert_fishnet_state_dict`.

Detection outputs (``out_indices``, default ``(6, 7, 8, 9)``): the body's last stage (stride 4) and the three
head stages (strides 8, 16, 32), i.e. 320, 832, 1600, 2112 channels at full width. These are the deepest feature
of each stride, each carrying both the refined body features and the transferred tail/bridge features, which is
the paper's argument for using the head for region-level tasks (Sec. 4.2). Because the network is pre-activation,
a stage output is an un-normalised sum of residuals (the authors' classifier starts with BN-ReLU for that reason),
so ``out_bn_relu=True`` puts one BN-ReLU on each detection output before the FPN (keys ``out_norms.{j}.0``; they are
not in ImageNet checkpoints and start at identity-like BN weights).
"""
from __future__ import annotations

import collections
import re
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .freezing import apply_freezing

NETWORK_PLANES = (64, 128, 256, 512, 512, 512, 384, 256, 320, 832, 1600)
# depth -> (residual blocks per stage, transfer blocks per body/head stage), from the authors' model definitions
CONFIGS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    99: ((2, 2, 6, 2, 1, 1, 1, 1, 2, 2), (1, 1, 1, 1, 1, 4)),
    150: ((2, 4, 8, 4, 2, 2, 2, 2, 2, 4), (2, 2, 2, 2, 2, 4)),
    201: ((3, 4, 12, 4, 2, 2, 2, 2, 3, 10), (2, 2, 2, 2, 2, 9)),
}
# Source of each body/head stage's transfer, as an index into [stem, stage 0, ..., stage 9]: body stages take
# the tail features (and the stem) of their resolution, head stages the body/bridge features of theirs.
TRANSFER_SOURCES = (2, 1, 0, 6, 5, 4)
STAGE_STRIDES = (8, 16, 32, 32, 16, 8, 4, 8, 16, 32)
NUM_STAGES = 10


def _bn_relu_conv(in_channels: int, out_channels: int, **conv_kwargs) -> list[nn.Module]:
    return [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)]


class PreActBottleneck(nn.Module):
    """BN-ReLU-1×1, BN-ReLU-3×3 (dilated), BN-ReLU-1×1 at a quarter of the output width, plus a shortcut.

    The shortcut is the identity, a BN-ReLU-1×1 projection when the width changes, or, for the first block of a
    body stage (``reduce_k`` set; the paper's "UP" blocks), the parameter-free channel-wise reduction that sums
    groups of ``reduce_k`` adjacent channels, so that up-sampling does not need an isolated 1×1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, reduce_k: int | None = None) -> None:
        super().__init__()
        mid = out_channels // 4
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(mid), nn.Conv2d(mid, out_channels, 1, bias=False)
        self.reduce_k = reduce_k
        self.shortcut: nn.Module | None = None
        if reduce_k is not None:
            if in_channels != out_channels * reduce_k:
                raise ValueError(f"FishNet up-sampling block: {in_channels} input channels cannot be reduced by "
                                 f"k={reduce_k} to {out_channels}")
        elif in_channels != out_channels:
            self.shortcut = nn.Sequential(*_bn_relu_conv(in_channels, out_channels, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x), inplace=True))
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        out = self.conv3(F.relu(self.bn3(out), inplace=True))
        if self.reduce_k is not None:
            n, c, h, w = x.shape
            identity = x.view(n, c // self.reduce_k, self.reduce_k, h, w).sum(2)
        elif self.shortcut is not None:
            identity = self.shortcut(x)
        else:
            identity = x
        return out + identity


def _blocks(in_channels: int, out_channels: int, num: int, dilation: int = 1,
            reduce_k: int | None = None) -> nn.Sequential:
    layers = [PreActBottleneck(in_channels, out_channels, dilation if reduce_k is not None else 1, reduce_k)]
    layers += [PreActBottleneck(out_channels, out_channels, dilation) for _ in range(num - 1)]
    return nn.Sequential(*layers)


class Bridge(nn.Module):
    """The stride-32 link between tail and body: s = 1×1 (C→C/2) then 1×1 (C/2→2C); the output is
    ``blocks(s) * a + a`` with an SE-like attention ``a`` computed from s (paper Sec. 3.2)."""

    def __init__(self, channels: int, num_blocks: int) -> None:
        super().__init__()
        half = channels // 2
        self.squeeze = nn.Sequential(*_bn_relu_conv(channels, half, kernel_size=1), nn.BatchNorm2d(half),
                                     nn.ReLU(inplace=True))
        self.expand = nn.Conv2d(half, 2 * channels, 1)
        self.blocks = _blocks(2 * channels, channels, num_blocks)
        self.attention = nn.Sequential(nn.BatchNorm2d(2 * channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                                       nn.Conv2d(2 * channels, channels // 16, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(channels // 16, channels, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        s = self.expand(self.squeeze(x))
        a = self.attention(s)
        return self.blocks(s) * a + a


class RefineStage(nn.Module):
    """A body (up-sampling) or head (down-sampling) stage: ``cat(sample(blocks(x)), transfer(earlier))``."""

    def __init__(self, blocks: nn.Sequential, transfer: nn.Sequential, upsample: bool) -> None:
        super().__init__()
        self.blocks, self.transfer, self.upsample = blocks, transfer, upsample

    def forward(self, x: Tensor, earlier: Tensor) -> Tensor:
        x = self.blocks(x)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.upsample else F.max_pool2d(x, 2, 2)
        return torch.cat([x, self.transfer(earlier)], dim=1)


class FishNet(nn.Module):
    """FishNet-99/150/201 as a detection backbone (``forward -> [stages[i] for i in out_indices]``) or, with
    ``num_classes`` and ``out_indices=()``, as the ImageNet classifier (``forward -> logits``).

    ``frozen_stages=n`` freezes the stem and stages 0..n-1 (0: the stem only, -1: nothing); ``norm_eval`` keeps
    every BatchNorm in eval mode while training. ``width_divisor`` divides all widths (tests use 1/8 width).
    Inputs must be padded to a multiple of 32 (three poolings after the stride-4 stem, undone by the body).
    """

    def __init__(self, depth: int | None = 99, num_res_blks: list[int] | None = None,
                 num_trans_blks: list[int] | None = None, network_planes: list[int] | None = None,
                 width_divisor: int = 1, num_classes: int | None = None, out_indices: tuple[int, ...] = (6, 7, 8, 9),
                 frozen_stages: int = -1, norm_eval: bool = False, out_bn_relu: bool = True,
                 weights: str | None = None) -> None:
        super().__init__()
        if depth is not None and depth not in CONFIGS:
            raise ValueError(f"FishNet: depth={depth} is not one of {sorted(CONFIGS)} (FishNet-188 has no public "
                             f"definition; give num_res_blks/num_trans_blks instead)")
        res = list(num_res_blks or (CONFIGS[depth][0] if depth is not None else []))
        trans = list(num_trans_blks or (CONFIGS[depth][1] if depth is not None else []))
        planes = [p // width_divisor for p in (network_planes or NETWORK_PLANES)]
        if len(res) != NUM_STAGES or len(trans) != 6 or len(planes) != NUM_STAGES + 1:
            raise ValueError(f"FishNet: need 10 num_res_blks, 6 num_trans_blks and 11 network_planes, got "
                             f"{len(res)}, {len(trans)}, {len(planes)}")
        if planes[3] != planes[4]:
            raise ValueError(f"FishNet: the bridge keeps the tail's width, network_planes[3]={planes[3]} must equal "
                             f"network_planes[4]={planes[4]}")
        if any(i not in range(NUM_STAGES) for i in out_indices):
            raise ValueError(f"FishNet: out_indices {out_indices} must lie in 0..9")
        if not out_indices and num_classes is None:
            raise ValueError("FishNet: with out_indices=() the network needs num_classes (it returns logits)")
        self.depth, self.out_indices = depth, tuple(out_indices)
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval

        stem = planes[0]
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, stem // 2, stride=2))
        self.conv2 = nn.Sequential(*_conv_bn_relu(stem // 2, stem // 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(stem // 2, stem))

        channels = [stem]  # channels of [stem, stage 0, ..., stage 9]
        self.tail = nn.ModuleList()
        for i in range(3):
            self.tail.append(_blocks(channels[-1], planes[i + 1], res[i]))
            channels.append(planes[i + 1])
        self.bridge = Bridge(planes[4], res[3])
        channels.append(planes[4])
        self.body, self.head = nn.ModuleList(), nn.ModuleList()
        for i in range(4, NUM_STAGES):
            j = i - 4
            src = channels[TRANSFER_SOURCES[j]]
            upsample = i < 7
            if upsample:
                if channels[-1] % planes[i + 1]:
                    raise ValueError(f"FishNet: body stage {i} reduces {channels[-1]} channels to {planes[i + 1]}, "
                                     f"which does not divide")
                blocks = _blocks(channels[-1], planes[i + 1], res[i], dilation=2 ** j,
                                 reduce_k=channels[-1] // planes[i + 1])
            else:
                blocks = _blocks(channels[-1], planes[i + 1], res[i])
            (self.body if upsample else self.head).append(RefineStage(blocks, _blocks(src, src, trans[j]), upsample))
            channels.append(planes[i + 1] + src)
        self.stage_channels: list[int] = channels[1:]

        self.classifier: nn.ModuleDict | None = None
        if num_classes is not None:
            last = channels[-1]
            self.classifier = nn.ModuleDict({
                "conv": nn.Sequential(*_bn_relu_conv(last, last // 2, kernel_size=1), nn.BatchNorm2d(last // 2),
                                      nn.ReLU(inplace=True)),
                "fc": nn.Conv2d(last // 2, num_classes, 1),
            })
        self.out_channels: list[int] = [self.stage_channels[i] for i in self.out_indices]
        self.strides: list[int] = [STAGE_STRIDES[i] for i in self.out_indices]
        self.out_norms: nn.ModuleList | None = None
        if out_bn_relu and self.out_indices:
            self.out_norms = nn.ModuleList(
                nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True)) for c in self.out_channels)
        self._init_weights()
        if weights is not None:
            self.load_weights(weights)
        self.train(self.training)  # apply frozen_stages now, not only at the first .train()

    def _init_weights(self) -> None:
        # the authors' initialisation: He-normal (fan-out) convolutions, unit BN
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, _BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward
    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """(stem output, the ten stage outputs, logits or None)."""
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"FishNet: input size {h}x{w} is not a multiple of 32; pad it (the body's up-sampled "
                             f"features must match the tail's in size)")
        stem = F.max_pool2d(self.conv3(self.conv2(self.conv1(x))), 3, stride=2, padding=1)
        feats = [stem]  # [stem, stage 0, ..., stage 9]
        for blocks in self.tail:
            feats.append(F.max_pool2d(blocks(feats[-1]), 2, 2))
        feats.append(self.bridge(feats[-1]))
        for j, stage in enumerate([*self.body, *self.head]):
            feats.append(stage(feats[-1], feats[TRANSFER_SOURCES[j]]))
        logits = None
        if self.classifier is not None:
            pooled = F.adaptive_avg_pool2d(self.classifier["conv"](feats[-1]), 1)
            logits = self.classifier["fc"](pooled).flatten(1)
        return stem, feats[1:], logits

    def forward(self, x: Tensor) -> list[Tensor] | Tensor:
        _, stages, logits = self.forward_stages(x)
        if not self.out_indices:
            return logits
        outs = [stages[i] for i in self.out_indices]
        if self.out_norms is not None:
            outs = [norm(o) for norm, o in zip(self.out_norms, outs, strict=True)]
        return outs

    # ------------------------------------------------------------------ training modes
    def _stage_modules(self, n: int) -> list[nn.Module]:
        """Stem (n = 0) and stages 0..n-1 in forward order."""
        modules: list[nn.Module] = [self.conv1, self.conv2, self.conv3]
        ordered = [*self.tail, self.bridge, *self.body, *self.head]
        return modules + ordered[:n]

    def train(self, mode: bool = True) -> FishNet:
        super().train(mode)
        frozen = self._stage_modules(self.frozen_stages) if self.frozen_stages >= 0 else []
        apply_freezing(self, frozen, self.norm_eval, mode)
        return self

    # ------------------------------------------------------------------ checkpoints
    def load_weights(self, path: str) -> None:
        """Load the authors' checkpoint (a released ``.tar`` or a bare state dict) through the key map. Missing
        weights are an error except our ``out_norms``; the classifier is ignored when ``num_classes`` is None."""
        state = convert_fishnet_state_dict(load_fishnet_checkpoint(path))
        if self.classifier is None:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("out_norms.")]
        if missing or result.unexpected_keys:
            raise KeyError(f"FishNet: {path} does not fit FishNet-{self.depth}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


# The authors' names -> ours. Their stages live in ``fish.fish.{i}`` as lists: tail [blocks, pool]; bridge
# [squeeze, expand, blocks, [attention]]; body/head [blocks, transfer, sampler, (last: score conv, [pool, fc])].
_AUTHOR_KEY_RULES: list[tuple[str, str]] = [
    (r"^fish\.fish\.([0-2])\.0\.", r"tail.\1."),
    (r"^fish\.fish\.3\.0\.", "bridge.squeeze."),
    (r"^fish\.fish\.3\.1\.", "bridge.expand."),
    (r"^fish\.fish\.3\.2\.", "bridge.blocks."),
    (r"^fish\.fish\.3\.3\.0\.", "bridge.attention."),
    (r"^fish\.fish\.9\.3\.", "classifier.conv."),
    (r"^fish\.fish\.9\.4\.1\.", "classifier.fc."),
]


def _refine_key(match: re.Match) -> str:
    stage, part = int(match.group(1)), int(match.group(2))
    group, index = ("body", stage - 4) if stage < 7 else ("head", stage - 7)
    return f"{group}.{index}.{('blocks', 'transfer')[part]}."


def convert_fishnet_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' ``FishNet`` state dict (optionally ``module.``-prefixed, from DataParallel) in our names."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl in _AUTHOR_KEY_RULES:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        else:
            new = re.sub(r"^fish\.fish\.([4-9])\.([01])\.", _refine_key, new)
        out[new] = value
    return out


def load_fishnet_checkpoint(path: str | PathLike) -> dict[str, Tensor]:
    """Read a checkpoint without executing pickled code: the release files hold ``epoch``, ``arch``,
    ``state_dict``, ``best_prec1`` and ``optimizer``; numpy scalars are the only non-torch objects allowed."""
    import numpy as np

    allowed: list = [collections.OrderedDict, np.dtype]
    core = getattr(np, "_core", None) or np.core
    allowed += [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray]
    allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32")]
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError names the offending global
        raise RuntimeError(f"FishNet: {path} holds objects outside the safe allowlist ({err}); re-save its "
                           f"'state_dict' alone with torch.save") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise TypeError(f"FishNet: {path} holds {type(state).__name__}, not a state dict")
    return state
