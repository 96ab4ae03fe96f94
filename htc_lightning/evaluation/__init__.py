"""COCO evaluation (box / mask AP, proposal AR) for htc-lightning."""
from htc_lightning.evaluation.coco import CocoEvaluator, detections_to_coco, encode_masks, metric_names

__all__ = ["CocoEvaluator", "detections_to_coco", "encode_masks", "metric_names"]
