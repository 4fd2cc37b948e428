"""Errors raised by the checkpoint modules (re-exported by :mod:`kasmina.checkpoint`)."""

from __future__ import annotations

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "UnsafeCheckpointError",
]


class CheckpointError(Exception):
    """Base class of every checkpoint error."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No checkpoint with that id (or none for that seed) exists."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files are damaged or incomplete: bit flip, truncation, a missing or
    garbled sidecar, a sidecar without payload or a payload without sidecar. The message
    names the file and what is wrong with it."""

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointWriteError(CheckpointError):
    """A save (or move) failed at the operating-system level, e.g. the disk is full.
    Nothing of the failed save is left behind; earlier checkpoints are intact.
    ``errno`` is the underlying ``OSError``'s errno (``errno.ENOSPC`` for a full disk)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class UnsafeCheckpointError(CheckpointError):
    """A v1 ``.pt`` file whose pickle would import or call something outside PyTorch's
    weights-only allow-list. It was refused and nothing in it was executed."""
