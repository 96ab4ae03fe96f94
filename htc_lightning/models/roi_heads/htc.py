"""The old import path of the cascade RoI head, kept for one release: configs and checkpoints written before
the rename name ``htc_lightning.models.roi_heads.htc.HTCRoIHead``. New code uses
``htc_lightning.models.roi_heads.cascade.CascadeRoIHead``."""
from .cascade import CascadeRoIHead, boxes_to_rois

HTCRoIHead = CascadeRoIHead

__all__ = ["CascadeRoIHead", "HTCRoIHead", "boxes_to_rois"]
