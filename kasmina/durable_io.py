"""Atomic, durable file writes.

The protocol: write a temp file in the destination folder -> fsync it -> publish it under
its final name (``os.replace``, or a hard link when an existing file must not be
overwritten) -> fsync the folder. A reader sees the old file or the whole new one, never
a torn one, and once the call returns the new file survives a power loss.
``durable=False`` skips the fsyncs: still atomic for readers, but **not** crash-safe
(a power loss may leave an empty or missing file); use it for tests and scratch data.

Temp files are named ``.kasmina-tmp-<pid>-<n>-<name>.tmp``; :func:`clean_stale_temps`
removes the ones whose writing process is gone and never touches anything else.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "TEMP_PREFIX",
    "TempFile",
    "atomic_write",
    "clean_stale_temps",
    "fsync_dir",
    "is_temp_name",
    "publish",
    "write_temp",
]

TEMP_PREFIX = ".kasmina-tmp-"
_TEMP_RE = re.compile(r"^\.kasmina-tmp-(?P<pid>\d+)-\d+-.*\.tmp$")
_counter = itertools.count()  # next() on itertools.count is atomic under the GIL
# Filesystems without hard links answer link() with one of these.
_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}

Buffer = bytes | bytearray | memoryview
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024)


def is_temp_name(name: str) -> bool:
    """True for the name of a temp file written by this module."""
    return _TEMP_RE.match(name) is not None


class TempFile:
    """A new temp file in ``folder``, open for writing: ``write``, then ``sync`` (fsync)
    and ``finish`` (close), then publish ``path``; ``discard`` removes it on failure.
    Several can be written first and synced afterwards, one fsync right after another."""

    def __init__(self, folder: str | os.PathLike[str], label: str) -> None:
        self.path = f"{os.fspath(folder)}/{TEMP_PREFIX}{os.getpid()}-{next(_counter)}-{label}.tmp"
        self._fd: int | None = os.open(self.path, _CREATE_FLAGS, 0o644)
        self._synced = False

    def write(self, chunks: Sequence[Buffer]) -> None:
        """Write ``chunks`` (bytes-like objects of byte format) in order."""
        _write_all(self._fd, chunks)  # type: ignore[arg-type]

    def start_writeback(self) -> None:
        """Ask the kernel to start writing the data out now, while the caller does other
        work (``posix_fadvise(DONTNEED)``, which never drops unwritten data). Only a hint:
        :meth:`sync` still makes the file durable, it just finds less left to do (on ext4,
        files written back before one fsync's journal commit ride along with it)."""
        fadvise = getattr(os, "posix_fadvise", None)
        if fadvise is not None:
            try:
                fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # a hint nobody has to take

    def sync(self) -> None:
        """fsync the file (once: later calls do nothing)."""
        if not self._synced:
            os.fsync(self._fd)  # type: ignore[arg-type]
            self._synced = True

    def finish(self, inode: bool = False) -> int | None:
        """Close the file; return its inode if asked. Closing twice is harmless."""
        fd, self._fd = self._fd, None
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_ino if inode else None
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the file (quietly: the caller is already handling a failure)."""
        try:
            self.finish()
        except OSError:
            pass
        _unlink_quietly(self.path)


def write_temp(folder: str | os.PathLike[str], label: str, chunks: Sequence[Buffer], *, durable: bool = True) -> str:
    """Write ``chunks`` (bytes-like objects of byte format) to a new temp file in
    ``folder``, fsynced when ``durable``, and return its path. On any error the temp file
    is removed and the error re-raised (an ``OSError`` such as ENOSPC keeps its errno)."""
    temp = TempFile(folder, label)
    try:
        temp.write(chunks)
        if durable:
            temp.sync()
        temp.finish()
    except BaseException:
        temp.discard()
        raise
    return temp.path


def _write_all(fd: int, chunks: Sequence[Buffer]) -> None:
    """Write every byte of ``chunks``: one ``writev`` unless the kernel writes less."""
    total = sum(memoryview(chunk).nbytes for chunk in chunks)
    done = os.writev(fd, chunks) if len(chunks) <= _IOV_MAX else 0
    if done == total:
        return
    views = [view for view in (memoryview(chunk).cast("B") for chunk in chunks) if view.nbytes]
    first = 0
    while True:  # skip what is written, write the rest
        while first < len(views) and done >= views[first].nbytes:
            done -= views[first].nbytes
            first += 1
        if first == len(views):
            return
        if done:
            views[first] = views[first][done:]
        done = os.writev(fd, views[first : first + _IOV_MAX])
        if done <= 0:
            raise OSError(errno.EIO, f"writing to fd {fd} made no progress")


def publish(temp: str | os.PathLike[str], final: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Give ``temp`` its final name atomically.

    ``overwrite=True`` uses ``os.replace``. ``overwrite=False`` never replaces an existing
    file: it raises ``FileExistsError`` instead (hard link then unlink of the temp; on a
    filesystem without hard links an ``O_EXCL`` placeholder reserves the name first).
    ``temp`` is gone afterwards unless an error is raised."""
    if overwrite:
        os.replace(temp, final)
        return
    try:
        os.link(temp, final)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(temp, final)
        return
    os.unlink(temp)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so the names created, renamed or removed in it are durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: Buffer | Iterable[Buffer], *, durable: bool = True, overwrite: bool = True) -> None:
    """Write ``data`` (bytes or an iterable of buffers) to ``path`` atomically, and
    durably unless ``durable=False``. See :func:`publish` for ``overwrite``."""
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    temp = write_temp(path.parent, path.name, chunks, durable=durable)
    try:
        publish(temp, path, overwrite=overwrite)
    except BaseException:
        _unlink_quietly(temp)
        raise
    if durable:
        fsync_dir(path.parent)


def clean_stale_temps(folder: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove temp files in ``folder`` (listed by ``names``, or listed here) whose writer
    process no longer exists (left by a crash). Files of live processes and every other
    file are left alone."""
    removed: list[Path] = []
    if names is None:
        try:
            names = [entry.name for entry in os.scandir(folder)]
        except FileNotFoundError:
            return removed
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        match = _TEMP_RE.match(name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        if _unlink_quietly(folder / name):
            removed.append(folder / name)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _unlink_quietly(path: str | os.PathLike[str]) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
