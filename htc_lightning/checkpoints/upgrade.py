"""Checkpoints of ``htc-lightning fit`` written before the Detector wired its parts with a ``FeatureSpec``:
their state dicts load unchanged (no module was renamed), but their saved detector config names arguments that
are gone. :func:`upgrade_detector_config` rewrites such a config; reading a checkpoint's detector goes through
:func:`detector_config` so that test, predict, the Predictor and export all accept both."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# where the parts used to take their input width (and the RoI head its class count); the Detector passes both now
_WIDTH_ARGS = ("in_channels", "in_strides")
_CASCADE = "htc_lightning.models.roi_heads.cascade.CascadeRoIHead"
_OLD_HEAD_PATHS = {"htc_lightning.models.roi_heads.htc.HTCRoIHead": _CASCADE}


def _init_args(node: Any) -> dict | None:
    return node.setdefault("init_args", {}) if isinstance(node, dict) and "class_path" in node else None


def upgrade_detector_config(spec: Mapping[str, Any]) -> dict:
    """A saved ``Detector`` config (``{"class_path": ..., "init_args": ...}``) in today's arguments; a config that
    is already current comes back equal."""
    spec = copy.deepcopy(dict(spec))
    init = _init_args(spec)
    if init is None:
        return spec
    for part in ("neck", "rpn_head"):
        args = _init_args(init.get(part))
        for name in _WIDTH_ARGS if args is not None else ():
            args.pop(name, None)
    head = init.get("roi_head")
    args = _init_args(head)
    if args is None:
        return spec
    head["class_path"] = _OLD_HEAD_PATHS.get(head["class_path"], head["class_path"])
    old = "num_classes" in args or "in_channels" in args
    if "num_classes" in args:
        init.setdefault("num_classes", args.pop("num_classes"))
    args.pop("in_channels", None)
    if old and head["class_path"] == _CASCADE:
        # CascadeRoIHead's defaults used to be HTC's (a saved config lists every argument; a hand-written one may not)
        args.setdefault("interleaved", True)
        args.setdefault("mask_info_flow", True)
    for part in ("semantic_head", "bbox_head", "mask_head"):
        sub = _init_args(args.get(part))
        if sub is not None:
            sub.pop("in_channels", None)
            if part != "semantic_head":
                sub.pop("num_classes", None)
    return spec


def detector_config(hparams: Mapping[str, Any]) -> dict | None:
    """The (upgraded) detector config of a checkpoint's ``hyper_parameters``, or None when it has none."""
    spec = hparams.get("detector")
    return upgrade_detector_config(spec) if isinstance(spec, Mapping) and "class_path" in spec else None
