"""htc-lightning: Hybrid Task Cascade, Guided Anchoring RPN and FishNet in PyTorch Lightning."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import htc_lightning` (the CLI, the data workers) does not pay for the model imports.
    if name in ("Predictor", "Prediction"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'htc_lightning' has no attribute {name!r}")
