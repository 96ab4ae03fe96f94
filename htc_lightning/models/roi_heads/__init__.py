"""Second-stage heads: the cascade RoI head (HTC, Cascade Mask R-CNN, Mask R-CNN) and its parts."""
from .bbox_head import Shared2FCBBoxHead
from .cascade import CascadeRoIHead, boxes_to_rois
from .mask_head import FCNMaskHead
from .semantic_head import FusedSemanticHead

__all__ = ["CascadeRoIHead", "FCNMaskHead", "FusedSemanticHead", "Shared2FCBBoxHead", "boxes_to_rois"]
