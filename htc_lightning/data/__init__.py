"""Data pipeline: COCO(-Stuff) dataset, mmdet-style transforms, grouped sampler, datamodule, synthetic data."""
from .coco import CocoDetection, ImageFolder
from .datamodule import CocoDataModule
from .samplers import GroupedBatchSampler
from .synthetic import make_synthetic_coco
from .transforms import DetectionCollate, DetectionTransform, rescale_size, sample_train_scale

__all__ = ["CocoDataModule", "CocoDetection", "DetectionCollate", "DetectionTransform", "GroupedBatchSampler",
           "ImageFolder", "make_synthetic_coco", "rescale_size", "sample_train_scale"]
