"""Import mmdetection checkpoints (model-zoo files, or the oracle's dumps) into our detectors.

Our submodules carry mmdet's names, except that mmdet wraps many convolutions in a ``ConvModule``
(keys ``...convs.0.conv.weight``) where we use a plain ``nn.Conv2d`` (``...convs.0.weight``). Every
rename lives in :data:`KEY_RULES`, one table, applied in order; a key no rule touches is kept as is.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..models.detector import Detector

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


def checkpoint_num_classes(state_dict: dict[str, Tensor]) -> int | None:
    """The class count of a (converted, v2-layout) state dict: the first box stage's ``fc_cls`` rows minus
    the background; None for a proposal-only model."""
    weight = state_dict.get("roi_head.bbox_head.0.fc_cls.weight")
    return None if weight is None else int(weight.shape[0]) - 1


def convert_mmdet_state_dict(state_dict: dict[str, Tensor], checkpoint_format: Literal["v2", "v1"] = "v2",
                             num_classes: int | None = None) -> dict[str, Tensor]:
    """mmdet key layout -> ours. ``checkpoint_format="v1"``: mmdet 1.x put the background class first in
    ``fc_cls``, in per-class ``fc_reg`` and in the mask head's ``conv_logits``; move/drop it. ``num_classes``
    (the checkpoint's, without background) defaults to what its first ``fc_cls`` says."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in KEY_RULES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    if checkpoint_format == "v1":
        if num_classes is None:
            num_classes = checkpoint_num_classes(out)  # v1's fc_cls has background + classes rows as well
        out = {k: _v1_to_v2(k, v, num_classes) for k, v in out.items()}
    return out


def _v1_to_v2(key: str, value: Tensor, num_classes: int | None) -> Tensor:
    if re.search(r"bbox_head(\.\d+)?\.fc_cls\.(weight|bias)$", key):
        return torch.cat([value[1:], value[:1]], 0)  # background first -> last
    if re.search(r"mask_head(\.\d+)?\.conv_logits\.(weight|bias)$", key):
        if num_classes is None or value.shape[0] == num_classes + 1:
            return value[1:]
    if re.search(r"bbox_head(\.\d+)?\.fc_reg\.(weight|bias)$", key) and value.shape[0] > 4:
        # per-class regression: v1 had 4 (unused) background rows first; v2 has none. mmdet's upgrade script
        # drops the first four rows of the weight but the last four of the bias; the background's are the first.
        if num_classes is None or value.shape[0] == 4 * (num_classes + 1):
            return value[4:]
    return value


def read_checkpoint(path: str | PathLike) -> dict[str, Tensor]:
    """The state_dict of a model-zoo file (``{'state_dict': ..., 'meta': ...}``), a bare state_dict, or the
    detector's weights of one of our Lightning ``.ckpt`` files (``detector.`` prefix removed), unpickled with
    ``weights_only=True`` and a small allowlist (never arbitrary objects)."""
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
    if obj and all(k.startswith("detector.") for k in obj):  # DetectionModule's own checkpoint
        obj = {k.removeprefix("detector."): v for k, v in obj.items()}
    return obj


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)        # ours, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)     # in the checkpoint, not ours
    mismatched: list[str] = field(default_factory=list)     # same name, other shape (not a class count)
    reinitialised: list[str] = field(default_factory=list)  # class-count layers kept at their initialisation
    loaded: int = 0
    num_classes: int | None = None             # the detector's
    checkpoint_num_classes: int | None = None  # the checkpoint's

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.reinitialised)

    def format(self, source: str) -> str:
        """One report naming every key that was not loaded as is."""
        lines = [f"{source}: loaded {self.loaded} tensors"]
        if self.reinitialised:
            lines.append(f"  re-initialised for {self.num_classes} classes (checkpoint: "
                         f"{self.checkpoint_num_classes}): " + " ".join(self.reinitialised))
        if self.missing:
            lines.append("  missing (kept their initialisation): " + " ".join(self.missing))
        if self.unexpected:
            lines.append("  unexpected (ignored): " + " ".join(self.unexpected))
        return "\n".join(lines)


def _class_count_only(key: str, theirs: Tensor, ours: Tensor, class_sized: Sequence[str]) -> bool:
    """Same layer for another number of classes: a tensor the detector declares class-sized, only the first
    dimension differs (and for box regression both per-class: 4 x classes rows)."""
    if key not in class_sized or theirs.shape[1:] != ours.shape[1:]:
        return False
    if ".fc_reg." in key:
        return theirs.shape[0] > 4 and ours.shape[0] > 4
    return True


def load_mmdet_checkpoint(detector: Detector, path_or_state_dict: str | PathLike | dict[str, Tensor],
                          strict: bool = True, checkpoint_format: Literal["v2", "v1"] = "v2",
                          reinit_class_layers: bool = False) -> LoadReport:
    """Load an mmdet checkpoint into ``detector`` (whose attributes are ``backbone``, ``neck``, ``rpn_head``,
    ``roi_head``). Returns what did not match; with ``strict`` any mismatch raises, listing the keys.

    ``reinit_class_layers``: a class-specific layer (``fc_cls``, per-class ``fc_reg``, ``conv_logits``) whose
    shape differs only by the class count keeps the detector's initialisation and is listed in
    ``reinitialised`` instead of ``mismatched`` (fine-tuning on a dataset with other classes)."""
    sd = path_or_state_dict if isinstance(path_or_state_dict, dict) else read_checkpoint(path_or_state_dict)
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = convert_mmdet_state_dict(sd, checkpoint_format)
    sd = detector.convert_checkpoint_keys(sd)
    own = detector.state_dict()
    report = LoadReport(num_classes=None if detector.roi_head is None else detector.num_classes,
                        checkpoint_num_classes=checkpoint_num_classes(sd))
    report.missing = sorted(k for k in own if k not in sd)
    report.unexpected = sorted(k for k in sd if k not in own)
    differ = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    class_sized = detector.class_sized_parameters
    report.reinitialised = [k for k in differ
                            if reinit_class_layers and _class_count_only(k, sd[k], own[k], class_sized)]
    report.mismatched = [k for k in differ if k not in report.reinitialised]
    if strict and not report.ok:
        raise ValueError("mmdet checkpoint does not match the detector:\n"
                         + "".join(f"  {name}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}\n"
                                   for name, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                                                      ("shape mismatch", report.mismatched + report.reinitialised))
                                   if keys))
    loadable = {k: v for k, v in sd.items() if k in own and k not in differ}
    detector.load_state_dict(loadable, strict=False)
    report.loaded = len(loadable)
    return report


def load_weights(detector: Detector, path: str | PathLike, checkpoint_format: Literal["v2", "v1"] = "v2",
                 allow_new_classes: bool = True) -> LoadReport:
    """``DetectionModule(load_from=...)``: initialise ``detector`` from an mmdet (v1/v2/v3) or our own checkpoint.

    Missing and unexpected keys are reported, not fatal; a shape mismatch other than a class count is an
    error naming the key and both shapes. A class-count mismatch re-initialises those layers when
    ``allow_new_classes`` (fine-tuning) and is an error otherwise (evaluating a never-trained classifier)."""
    sd = read_checkpoint(path)
    report = load_mmdet_checkpoint(detector, sd, strict=False, checkpoint_format=checkpoint_format,
                                   reinit_class_layers=True)
    own = detector.state_dict()
    if report.mismatched:
        converted = convert_mmdet_state_dict(sd, checkpoint_format)
        shapes = ", ".join(f"{k} {tuple(converted[k].shape) if k in converted else '?'} vs ours {tuple(own[k].shape)}"
                           for k in report.mismatched[:10])
        raise ValueError(f"{path}: tensors of another shape than the detector's (not a class count): {shapes}. "
                         "Is it the same architecture (widths, reg_class_agnostic, mask head)?")
    if report.loaded == 0:
        raise ValueError(f"{path}: no tensor of it matches the detector ({len(sd)} keys, e.g. {next(iter(sd), '')})")
    if report.reinitialised and not allow_new_classes:
        raise ValueError(f"{path} was trained for {report.checkpoint_num_classes} classes but the data has "
                         f"{report.num_classes}: its classifier would be evaluated untrained. Fine-tune it first "
                         "(htc-lightning fit --model.init_args.load_from ...), or evaluate on data with its classes.")
    return report
