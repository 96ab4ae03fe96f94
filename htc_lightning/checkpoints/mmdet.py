"""Import mmdetection checkpoints (model-zoo files, or the oracle's dumps) into our detectors.

Our submodules carry mmdet's names, except that mmdet wraps many convolutions in a ``ConvModule``
(keys ``...convs.0.conv.weight``) where we use a plain ``nn.Conv2d`` (``...convs.0.weight``). Every
rename lives in :data:`KEY_RULES`, one table, applied in order; a key no rule touches is kept as is.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from os import PathLike
from typing import Literal

import torch
from torch import Tensor, nn

# (pattern, replacement) applied with re.sub, every rule in order.
KEY_RULES: list[tuple[str, str]] = [
    # mmdet's proposal-only detector (``RPN``) calls its head ``bbox_head``
    (r"^bbox_head\.", "rpn_head."),
    # Mask R-CNN has one box and one mask head, not lists: ours are lists of one
    (r"^roi_head\.(bbox_head|mask_head)\.(?!\d)", r"roi_head.\1.0."),
    # FPN: ConvModule lateral and output convolutions
    (r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.", r"neck.\1.\2."),
    # FCN mask heads: the 4 convs and HTC's conv_res
    (r"^roi_head\.mask_head\.(\d+)\.(convs\.\d+|conv_res)\.conv\.", r"roi_head.mask_head.\1.\2."),
    # HTC's fused semantic head
    (r"^roi_head\.semantic_head\.(lateral_convs\.\d+|convs\.\d+|conv_embedding)\.conv\.",
     r"roi_head.semantic_head.\1."),
]

# What a model-zoo file may contain besides tensors: its ``meta`` holds strings, numbers, tuples,
# and occasionally numpy scalars/arrays. Nothing else is unpickled (weights_only=True).
def _safe_globals() -> list:
    import numpy as np

    allowed: list = [collections.OrderedDict, np.ndarray, np.dtype]
    try:
        allowed.append(np._core.multiarray._reconstruct)
        allowed.append(np._core.multiarray.scalar)
    except AttributeError:  # numpy < 2
        allowed.append(np.core.multiarray._reconstruct)
        allowed.append(np.core.multiarray.scalar)
    allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "uint8", "bool")]
    return allowed


def convert_mmdet_state_dict(state_dict: dict[str, Tensor], checkpoint_format: Literal["v2", "v1"] = "v2",
                             num_classes: int | None = None) -> dict[str, Tensor]:
    """mmdet key layout -> ours. ``checkpoint_format="v1"``: mmdet 1.x put the background class first in
    ``fc_cls`` and gave the mask head one extra (background) channel; move/drop them."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in KEY_RULES:
            new = re.sub(pattern, repl, new)
        if checkpoint_format == "v1":
            value = _v1_to_v2(new, value, num_classes)
        out[new] = value
    return out


def _v1_to_v2(key: str, value: Tensor, num_classes: int | None) -> Tensor:
    if re.search(r"bbox_head(\.\d+)?\.fc_cls\.(weight|bias)$", key):
        return torch.cat([value[1:], value[:1]], 0)  # background first -> last
    if re.search(r"mask_head(\.\d+)?\.conv_logits\.(weight|bias)$", key):
        if num_classes is None or value.shape[0] == num_classes + 1:
            return value[1:]
    if re.search(r"bbox_head(\.\d+)?\.fc_reg\.(weight|bias)$", key) and value.shape[0] > 4:
        raise ValueError(f"{key}: per-class box regression ({value.shape[0]} outputs) cannot be loaded into "
                         "our class-agnostic heads")
    return value


def read_checkpoint(path: str | PathLike) -> dict[str, Tensor]:
    """The state_dict of a model-zoo file (``{'state_dict': ..., 'meta': ...}``) or a bare state_dict,
    unpickled with ``weights_only=True`` and a small allowlist (never arbitrary objects)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler's message names the offending global
        raise ValueError(f"{path}: not a loadable checkpoint with weights_only=True ({err}). "
                         "Re-save just its state_dict if you trust the file.") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict, found {type(obj).__name__}")
    return obj


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)      # ours, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)   # in the checkpoint, not ours
    mismatched: list[str] = field(default_factory=list)   # same name, other shape

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def load_mmdet_checkpoint(detector: nn.Module, path_or_state_dict: str | PathLike | dict[str, Tensor],
                          strict: bool = True, checkpoint_format: Literal["v2", "v1"] = "v2") -> LoadReport:
    """Load an mmdet checkpoint into ``detector`` (whose attributes are ``backbone``, ``neck``, ``rpn_head``,
    ``roi_head``). Returns what did not match; with ``strict`` any mismatch raises, listing the keys."""
    sd = path_or_state_dict if isinstance(path_or_state_dict, dict) else read_checkpoint(path_or_state_dict)
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    num_classes = getattr(getattr(detector, "roi_head", None), "num_classes", None)
    sd = convert_mmdet_state_dict(sd, checkpoint_format, num_classes)
    if hasattr(detector, "convert_checkpoint_keys"):
        sd = detector.convert_checkpoint_keys(sd)
    own = detector.state_dict()
    report = LoadReport()
    report.missing = sorted(k for k in own if k not in sd)
    report.unexpected = sorted(k for k in sd if k not in own)
    report.mismatched = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    if strict and not report.ok:
        raise ValueError("mmdet checkpoint does not match the detector:\n"
                         + "".join(f"  {name}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}\n"
                                   for name, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                                                      ("shape mismatch", report.mismatched)) if keys))
    loadable = {k: v for k, v in sd.items() if k in own and k not in report.mismatched}
    detector.load_state_dict(loadable, strict=False)
    return report
