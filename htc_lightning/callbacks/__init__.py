"""Callbacks and plugins of the training system (faults, resume, checkpointing, prediction output)."""
from .checkpoint import DetectionCheckpoint, OptionalLearningRateMonitor
from .checkpoint_io import AtomicCheckpointIO
from .faults import SigtermCheckpoint
from .prediction_writer import CocoPredictionWriter
from .resume import ResumeState

__all__ = ["AtomicCheckpointIO", "CocoPredictionWriter", "DetectionCheckpoint", "OptionalLearningRateMonitor",
           "ResumeState", "SigtermCheckpoint"]
