"""Checkpoint files that are either complete or absent: write a temporary file, then ``os.replace``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves cannot leave a truncated checkpoint behind.

    The checkpoint is written to a hidden temporary file beside the target, flushed to disk, then renamed
    over the target with ``os.replace`` (atomic on POSIX and Windows within one filesystem). A job killed
    mid-save (SLURM time limit, OOM killer) therefore keeps the previous ``last.ckpt`` intact. Remote URLs
    (``s3://`` ...) go through Lightning's own fsspec path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, "
                            f"got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(target.parent)

    def write(self, checkpoint: dict[str, Any], f) -> None:
        """Serialise into the open temporary file (a seam for tests that simulate a crash mid-write)."""
        torch.save(checkpoint, f)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
