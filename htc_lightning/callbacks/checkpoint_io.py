"""Checkpoint files that are either complete or absent: write a temporary file, then ``os.replace``."""
from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves cannot leave a truncated checkpoint behind.

    The checkpoint is written to a hidden temporary file beside the target, flushed to disk, then renamed
    over the target with ``os.replace`` (atomic on POSIX and Windows within one filesystem). A job killed
    mid-save (SLURM time limit, OOM killer) therefore keeps the previous ``last.ckpt`` intact. Remote URLs
    (``s3://`` ...) go through Lightning's own fsspec path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, "
                            f"got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(target)
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


def temporary_path(target: Path, pid: int | None = None) -> Path:
    """Where a save of ``target`` by process ``pid`` (this one by default) writes before the rename."""
    return target.with_name(f".{target.name}.tmp{os.getpid() if pid is None else pid}")


_TEMPORARY = re.compile(r"\..+\.tmp(\d+)")


def stale_temporaries(directory: str | os.PathLike, min_age_s: float = 60.0) -> Iterator[Path]:
    """The temporary files of saves that were killed mid-write (SIGKILL, OOM killer, node failure): their process
    is gone (checked on this machine) and they were not written to for ``min_age_s`` seconds. A file of a live
    process, or of a save still writing (on another node of a shared filesystem), is never one of them."""
    folder = Path(directory)
    if not folder.is_dir():
        return
    now = time.time()
    for path in folder.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        try:
            if now - path.stat().st_mtime >= min_age_s:
                yield path
        except FileNotFoundError:  # renamed or removed meanwhile: not stale
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid of this machine: keep its file
        return True
    return True


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
