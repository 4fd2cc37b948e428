"""One listing of a checkpoint folder (see :func:`scan_folder`): its names, the inodes of
its sidecars and whether it is tidy, natively when the compiled extension is there."""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ._extension import HAS_EXTENSION
from .durable_io import TEMP_PREFIX

__all__ = ["BackgroundScan", "FolderScan", "Identity", "folder_identity", "scan_folder", "scan_folder_python"]

SETTLE_NS = 100_000_000  # a folder unchanged this long before a scan cannot hide a later change
# Folder times in whole seconds mean a file system that keeps no finer ones (ext4 with small
# inodes, HFS+, FAT: 1-2 s), where a change within the same second keeps them.
COARSE_SETTLE_NS = 3_000_000_000

# temp files in "/name/name/.../"
_TEMP_NAMES = re.compile(f"(?<=/)({re.escape(TEMP_PREFIX)}[^/]*)(?=/)")
Identity = tuple[int, int, int, int]  # a folder's (device, inode, mtime_ns, ctime_ns)


@dataclass(frozen=True)
class FolderScan:
    """One listing of a folder: every name, and the inode of each sidecar (``*.json``).
    ``identity`` is the folder's (device, inode, mtime, ctime) read just before the
    listing started at ``started_ns``; ``joined`` is every name as ``"/a/b/.../"`` ('/' is
    the one character no file name holds); ``tidy``: no temp files, and every sidecar has
    its payload and every payload its sidecar (one of each per checkpoint)."""

    identity: Identity
    started_ns: int
    joined: str
    sidecars: dict[str, int]
    tidy: bool

    @property
    def settled(self) -> bool:
        """True when no change made after this scan can leave the folder's mtime and ctime
        as they were (timestamps are coarse: a change right after another may keep them)."""
        mtime, ctime = self.identity[2], self.identity[3]
        whole_seconds = mtime % 1_000_000_000 == 0 and ctime % 1_000_000_000 == 0
        return self.started_ns - max(mtime, ctime) > (COARSE_SETTLE_NS if whole_seconds else SETTLE_NS)

    @cached_property
    def names(self) -> list[str]:
        return _split_joined(self.joined)

    @property
    def empty(self) -> bool:
        return len(self.joined) < 2

    def temp_names(self) -> list[str]:
        """The names that look like temp files of :mod:`kasmina.durable_io`."""
        return _TEMP_NAMES.findall(self.joined) if f"/{TEMP_PREFIX}" in self.joined else []


def folder_identity(folder: str | os.PathLike[str]) -> Identity:
    """(device, inode, mtime, ctime) of a folder: any entry added, removed or renamed in
    it changes the times (and a folder swapped for another changes the inode)."""
    st = os.stat(folder)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def scan_folder(folder: str | os.PathLike[str]) -> FolderScan:
    """List ``folder`` once: with the compiled extension in one native pass (a Python loop
    over 20,000 entries costs more than the kernel's listing), else with ``os.scandir``."""
    if not scans_natively(folder):
        return scan_folder_python(folder)
    path, identity, started = _listing_starts(folder)
    return _native_scan(identity, started, path, torch.ops.kasmina.scan_folder(path))


def scans_natively(folder: str | os.PathLike[str]) -> bool:
    """Whether the native listing can take ``folder``: the extension is there and the
    path is valid UTF-8 (an op's str argument cannot carry other bytes)."""
    if not HAS_EXTENSION:
        return False
    try:
        os.fsencode(folder).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _listing_starts(folder: str | os.PathLike[str]) -> tuple[str, Identity, int]:
    """(path, identity, start time) of a listing about to begin: the identity is read
    before the listing, so that a change during it shows as a changed identity later."""
    identity = folder_identity(folder)
    return os.fspath(folder), identity, time.time_ns()


def _native_scan(
    identity: Identity, started: int, path: str, listing: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]
) -> FolderScan:
    joined, sidecar_joined, inodes, tidy, error = listing
    if error:
        raise OSError(error, os.strerror(error), path)
    sidecars = dict(zip(_split_joined(os.fsdecode(sidecar_joined.numpy().tobytes())), inodes.tolist(), strict=True))
    return FolderScan(identity, started, os.fsdecode(joined.numpy().tobytes()), sidecars, bool(tidy))


def scan_folder_python(folder: str | os.PathLike[str]) -> FolderScan:
    """:func:`scan_folder` in Python (inodes from the listing itself)."""
    _, identity, started = _listing_starts(folder)
    names: list[str] = []
    sidecars: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            names.append(name)
            if name[-5:] == ".json" and name[0] != ".":
                sidecars[name] = entry.inode()
    joined = f"/{'/'.join(names)}/" if names else "/"
    return FolderScan(identity, started, joined, sidecars, _is_tidy(joined, names, sidecars))


class BackgroundScan:
    """The native :func:`scan_folder`, run on another thread (it releases the GIL while it
    lists) so that the caller can work meanwhile; ``result()`` waits for it."""

    def __init__(self, folder: Path) -> None:
        self._path, self._identity, self._started = _listing_starts(folder)
        self._listing: tuple | None = None
        self._error: BaseException | None = None
        self._listing_starts = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kasmina-scan-folder", daemon=True)
        self._thread.start()
        # Wait until the thread is about to list (and so to release the GIL): a busy caller
        # would otherwise hold the GIL, and the thread could not even start the listing.
        self._listing_starts.wait()

    def _run(self) -> None:
        try:
            scan = torch.ops.kasmina.scan_folder.default
            self._listing_starts.set()
            self._listing = scan(self._path)
        except BaseException as exc:  # handed to the caller of result()
            self._listing_starts.set()
            self._error = exc

    def result(self) -> FolderScan:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return _native_scan(self._identity, self._started, self._path, self._listing)  # type: ignore[arg-type]


def _split_joined(joined: str) -> list[str]:
    return joined[1:-1].split("/") if len(joined) > 1 else []


def _is_tidy(joined: str, names: list[str], sidecars: dict[str, int]) -> bool:
    if f"/{TEMP_PREFIX}" in joined or joined.count(".safetensors/") + joined.count(".pt/") != len(sidecars):
        return False
    # as many payloads as sidecars, and one for each sidecar: so exactly one each
    present = set(names)
    return all(f"{name[:-5]}.safetensors" in present or f"{name[:-5]}.pt" in present for name in sidecars)
