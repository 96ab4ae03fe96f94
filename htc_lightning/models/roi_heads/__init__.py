"""Second-stage heads: the HTC / Cascade Mask R-CNN / Mask R-CNN RoI head and its parts."""
from .bbox_head import Shared2FCBBoxHead
from .htc import HTCRoIHead, boxes_to_rois
from .mask_head import FCNMaskHead
from .semantic_head import FusedSemanticHead

__all__ = ["FCNMaskHead", "FusedSemanticHead", "HTCRoIHead", "Shared2FCBBoxHead", "boxes_to_rois"]
