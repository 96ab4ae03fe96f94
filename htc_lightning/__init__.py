"""htc-lightning: Hybrid Task Cascade, Guided Anchoring RPN and FishNet in PyTorch Lightning."""

__version__ = "0.1.0"
