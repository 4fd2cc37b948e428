"""Atomic, durable file writes.

The protocol: write a temp file in the destination folder -> fsync it -> publish it under
its final name (``os.replace``, or a hard link when an existing file must not be
overwritten) -> fsync the folder. A reader sees the old file or the whole new one, never
a torn one, and once the call returns the new file survives a power loss.
``durable=False`` skips the fsyncs: still atomic for readers, but **not** crash-safe
(a power loss may leave an empty or missing file); use it for tests and scratch data.

Temp files are unnamed where the system allows (Linux ``O_TMPFILE``, linked into place:
a crash leaves nothing behind), otherwise named ``.kasmina-tmp-<pid>-<n>-<name>.tmp``;
:func:`clean_stale_temps` removes the named ones whose writing process is gone and never
touches anything else.
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
    "anonymous_files_possible",
    "atomic_write",
    "clean_stale_temps",
    "fsync_dir",
    "is_temp_name",
    "no_anonymous_files",
    "open_dir",
]

TEMP_PREFIX = ".kasmina-tmp-"
_TEMP_RE = re.compile(r"^\.kasmina-tmp-(?P<pid>\d+)-\d+-.*\.tmp\Z")
_counter = itertools.count()  # next() on itertools.count is atomic under the GIL
# Filesystems without hard links answer link() with one of these.
_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
# ... and linking an anonymous file through /proc/self/fd also where /proc is not this
# process's (ENOENT) or the link resolves elsewhere (EXDEV). A folder that is really gone
# fails again when the named copy is made.
_NO_ANONYMOUS_LINK_ERRNOS = _NO_LINK_ERRNOS | {errno.ENOENT, errno.EXDEV}

Buffer = bytes | bytearray | memoryview
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
# An unnamed file in a folder (O_TMPFILE), named later by linking /proc/self/fd/N. Read
# and write: it is copied into a named temp where the folder cannot link it.
_ANONYMOUS_FLAGS = (
    os.O_RDWR | os.O_TMPFILE | getattr(os, "O_CLOEXEC", 0)
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
    else 0
)
# What open(O_TMPFILE) answers where it is not supported (old kernels: EISDIR).
_NO_TMPFILE_ERRNOS = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL}
_NAMED_ONLY: set[str] = set()  # folders found unable to make or link anonymous files
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024)


def anonymous_files_possible(folder: str) -> bool:
    """Whether unnamed temp files are tried in ``folder`` (the system has them and the
    folder has not refused them)."""
    return bool(_ANONYMOUS_FLAGS) and folder not in _NAMED_ONLY


def no_anonymous_files(folder: str) -> None:
    """Remember that ``folder`` cannot make or link unnamed files: named temps from now on."""
    _NAMED_ONLY.add(folder)


def is_temp_name(name: str) -> bool:
    """True for the name of a temp file written by this module."""
    return _TEMP_RE.match(name) is not None


class TempFile:
    """A new temp file in ``folder``, open for writing: ``write``, ``sync`` (fsync),
    ``link`` it under its final name, then ``close``; ``discard`` removes it on failure.
    Several can be written first and synced afterwards, one fsync right after another.

    ``anonymous=True`` makes it an unnamed file of the folder (Linux ``O_TMPFILE``),
    linked into place through ``/proc/self/fd``: no temp name is created and removed, and
    a crash leaves nothing behind (the file system frees an unlinked inode). Where that is
    not available it is a named temp file, and behaves the same."""

    def __init__(self, folder: str | os.PathLike[str], label: str, *, anonymous: bool = False) -> None:
        self.folder = os.fspath(folder)
        self.name: str | None = None  # the temp name in ``folder``; None while anonymous
        self._fd: int | None = None
        self._synced = False
        if anonymous and anonymous_files_possible(self.folder):
            try:
                self._fd = os.open(self.folder, _ANONYMOUS_FLAGS, 0o644)
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE_ERRNOS:
                    raise
                no_anonymous_files(self.folder)
        if self._fd is None:
            self.name = _temp_name(label)
            self._fd = os.open(f"{self.folder}/{self.name}", _CREATE_FLAGS, 0o644)

    @property
    def path(self) -> str:
        """The temp file's path (a named one only)."""
        if self.name is None:
            raise ValueError("an anonymous temp file has no path")
        return f"{self.folder}/{self.name}"

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

    def inode(self) -> int:
        """The file's inode number."""
        return os.fstat(self._fd).st_ino  # type: ignore[arg-type]

    def link(self, dir_fd: int, name: str) -> None:
        """Give the file the name ``name`` in its folder (open as ``dir_fd``) without ever
        replacing a file: ``FileExistsError`` when the name is taken. A named temp keeps
        its temp name until :meth:`close`, so a clash can be undone by unlinking ``name``."""
        if self.name is not None:
            _link_named(self.name, name, dir_fd)
            return
        try:  # linkat(AT_SYMLINK_FOLLOW), which os.link only uses when given a dir fd
            os.link(f"/proc/self/fd/{self._fd}", name, dst_dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in _NO_ANONYMOUS_LINK_ERRNOS:
                raise
            no_anonymous_files(self.folder)
            self._become_named()
            _link_named(self.name, name, dir_fd)  # type: ignore[arg-type]

    def _become_named(self) -> None:
        """Copy an anonymous file into a named temp file (synced if this one was) and
        continue with that one: for a folder that cannot link anonymous files."""
        named = TempFile(self.folder, "copy")
        try:
            size, done = os.fstat(self._fd).st_size, 0  # type: ignore[arg-type]
            while done < size:
                sent = os.sendfile(named._fd, self._fd, done, size - done)  # type: ignore[arg-type]
                if sent <= 0:
                    raise OSError(errno.EIO, f"copying temp file {named.path} made no progress")
                done += sent
            if self._synced:
                named.sync()
        except BaseException:
            named.discard()
            raise
        anonymous, self._fd, self.name = self._fd, named._fd, named.name
        os.close(anonymous)  # type: ignore[arg-type]

    def replace(self, dir_fd: int, name: str) -> None:
        """Rename this named temp file to ``name`` in its folder (open as ``dir_fd``),
        replacing any file there (``os.replace``); it then has no temp name left to drop."""
        os.replace(self.name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # type: ignore[arg-type]
        self.name = None

    def unlink(self, dir_fd: int, name: str) -> None:
        """Undo :meth:`link` of ``name``: the file is a named temp file again (an
        anonymous one cannot be linked twice, so it keeps a temp name from now on)."""
        if self.name is None:
            self.name = _temp_name("relinked")
            os.link(name, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        elif not _exists(self.name, dir_fd):  # renamed onto ``name`` (no hard links): rename it back
            os.replace(name, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        os.unlink(name, dir_fd=dir_fd)

    def close(self) -> None:
        """Close the file and drop its temp name, if it has one (once it is linked, or
        to give it up). Closing twice is harmless."""
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                os.close(fd)
        finally:
            if self.name is not None:
                _unlink_quietly(self.path)
                self.name = None

    def discard(self) -> None:
        """Close and remove the file (quietly: the caller is already handling a failure)."""
        try:
            self.close()
        except OSError:
            pass


def _temp_name(label: str) -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{next(_counter)}-{label}.tmp"


def _link_named(temp: str, final: str, dir_fd: int) -> None:
    """Link ``temp`` as ``final`` (both in the folder open as ``dir_fd``), never replacing.
    Without hard links an ``O_EXCL`` placeholder reserves ``final`` and ``temp`` is renamed
    onto it (``temp`` is then gone); an error in between removes the placeholder, but a
    crash there leaves it, empty: the price of a folder without hard links."""
    try:
        os.link(temp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        placeholder = os.open(final, _CREATE_FLAGS, 0o644, dir_fd=dir_fd)  # FileExistsError when taken
        try:
            os.close(placeholder)
            os.replace(temp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(final, dir_fd=dir_fd)
            except OSError:
                pass  # the caller is already handling a failure
            raise


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


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so the names created, renamed or removed in it are durable."""
    fd = os.open(folder, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: Buffer | Iterable[Buffer], *, durable: bool = True, overwrite: bool = True) -> None:
    """Write ``data`` (bytes or an iterable of buffers) to ``path`` atomically, and
    durably unless ``durable=False``. ``overwrite=True`` replaces an existing file
    (``os.replace``); ``overwrite=False`` raises ``FileExistsError`` instead and never
    replaces one. On any error nothing is left behind (an ``OSError`` such as ENOSPC keeps
    its errno)."""
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    dir_fd = open_dir(path.parent)
    try:
        temp = TempFile(path.parent, path.name)
        try:
            temp.write(chunks)
            if durable:
                temp.sync()
            if overwrite:
                temp.replace(dir_fd, path.name)
            else:
                temp.link(dir_fd, path.name)
        except BaseException:
            temp.discard()
            raise
        temp.close()
        if durable:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_dir(folder: str | os.PathLike[str]) -> int:
    """A file descriptor of ``folder``, for names relative to it and for fsync."""
    return os.open(folder, _DIR_FLAGS)


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


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


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
