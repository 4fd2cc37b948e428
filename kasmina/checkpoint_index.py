"""The cached metadata index of one checkpoint folder (see :class:`SidecarIndex`)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ._extension import HAS_EXTENSION
from .checkpoint_errors import CheckpointError
from .checkpoint_format import CheckpointInfo, compact_json, is_v2_sidecar, load_json, parse_sidecar
from .checkpoint_v1 import parse_v1_sidecar
from .durable_io import TEMP_PREFIX, atomic_write

__all__ = ["FolderScan", "SeedKey", "SidecarIndex", "folder_identity", "newest_first", "scan_folder", "scan_folder_python"]

SeedKey = tuple[str, str, int | None]  # (layer_id, kind, seed_id)
_SETTLE_NS = 100_000_000  # a folder unchanged this long before a scan cannot hide a later change
# Folder times in whole seconds mean a file system that keeps no finer ones (ext4 with small
# inodes, HFS+, FAT: 1-2 s), where a change within the same second keeps them.
_COARSE_SETTLE_NS = 3_000_000_000
_CACHE_FORMAT = "kasmina-checkpoint-index-cache/3"
_VOUCH_FORMAT = "kasmina-checkpoint-index-folder/1"
_CACHE_AFTER_PARSING = 256  # a refresh that had to read this many sidecars leaves a snapshot
_DECODE_BATCH = 256  # snapshot rows decoded at a time while a filtered listing walks the order
_MERGE_BY_SEARCH = 64  # up to this many entries besides the snapshot's are inserted by binary search

# temp files in "/name/name/.../"
_TEMP_NAMES = re.compile(f"(?<=/)({re.escape(TEMP_PREFIX)}[^/]*)(?=/)")
Identity = tuple[int, int, int, int]  # a folder's (device, inode, mtime_ns, ctime_ns)
Item = CheckpointInfo | int  # an entry of the newest-first order: an info, or a snapshot row not decoded yet


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
        return self.started_ns - max(mtime, ctime) > (_COARSE_SETTLE_NS if whole_seconds else _SETTLE_NS)

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
    if not HAS_EXTENSION:
        return scan_folder_python(folder)
    identity = folder_identity(folder)
    started = time.time_ns()
    path = os.fspath(folder)
    return _native_scan(identity, started, path, torch.ops.kasmina.scan_folder(path))


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
    identity = folder_identity(folder)
    started = time.time_ns()
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


class _BackgroundScan:
    """The native :func:`scan_folder`, run on another thread (it releases the GIL while it
    lists) so that the caller can work meanwhile; ``result()`` waits for it."""

    def __init__(self, folder: Path) -> None:
        self._path = os.fspath(folder)
        self._identity = folder_identity(folder)  # read before the listing starts
        self._started = time.time_ns()
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


def newest_first(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    return sorted(infos, key=_sort_key, reverse=True)


def _sort_key(info: CheckpointInfo) -> tuple[int, int, str]:
    return (info.created_ms, info.seq, info.checkpoint_id)


def _key_text(layer_id: str, kind: str, seed_id: int | None) -> str:
    """A seed key as one string (kind and seed contain no ':', so it is unambiguous)."""
    return f"{kind}:{seed_id}:{layer_id}"


def _info_key_text(info: CheckpointInfo) -> str:
    return _key_text(info.layer_id, info.kind, info.seed_id)


class _BrokenSnapshot(Exception):
    """A snapshot row that does not decode to the checkpoint its name says."""


class _Snapshot:
    """The rows of a snapshot file, newest first; a row is decoded only when asked for.

    File layout (UTF-8 text): a JSON header line ``{format, fields, count, crc32}``, then
    the JSON array of sidecar names, the JSON array of their inodes, the JSON array of
    their seed keys, then one JSON array of field values per row (its location is
    ignored: it is the index's own). ``crc32`` covers everything after the header line.

    ``folder`` is the folder's identity when the rows were taken from a settled scan of a
    tidy folder (see :attr:`FolderScan.tidy`), else None: while the folder still has
    that identity, the rows are exactly its sidecars and the folder needs no listing. It
    is kept in a small file of its own next to the snapshot (``{format, crc32, folder}``,
    see :func:`_vouch_path`), so vouching for an unchanged snapshot never rewrites the
    snapshot; it counts only for the snapshot whose ``crc32`` it names."""

    __slots__ = (
        "_keys",
        "_keys_start",
        "_maps",
        "_row_starts",
        "_rows",
        "_rows_start",
        "crc32",
        "data",
        "decoded",
        "folder",
        "inodes",
        "location",
        "names",
    )

    def __init__(
        self,
        names: list[str],
        inodes: list[int],
        location: str,
        folder: list[int] | None,
        data: bytes,
        crc32: int,
        keys_start: int,
        rows_start: int,
    ) -> None:
        self.data = data  # the whole file, as read (offsets below are into it)
        self.crc32 = crc32
        self.folder = folder
        self.names = names
        self.inodes = inodes
        self.location = location
        self.decoded: dict[int, CheckpointInfo] = {}
        self._keys: list[str] | None = None
        self._keys_start = keys_start  # where the key line starts, and the rows
        self._rows_start = rows_start
        self._row_starts = [rows_start]  # where the rows found so far start
        self._rows: list[bytes] | None = None  # split from the data when all are needed
        self._maps: tuple[dict[str, int], dict[str, int]] | None = None

    @classmethod
    def read(cls, path: Path, location: str) -> _Snapshot | None:
        """The snapshot in ``path``, or None when it is missing, of another format, or
        damaged in any way."""
        try:
            data = path.read_bytes()
            end = data.index(b"\n")
            header = json.loads(data[:end])
            crc32 = zlib.crc32(memoryview(data)[end + 1 :])  # the body, not copied: 10,000 rows make MBs
            if (
                header.get("format") != _CACHE_FORMAT
                or header.get("fields") != list(CheckpointInfo._fields)
                or header.get("crc32") != crc32
            ):
                return None
            count = header["count"]
            names_end = data.index(b"\n", end + 1)
            inodes_end = data.index(b"\n", names_end + 1)
            keys_end = data.find(b"\n", inodes_end + 1)  # the rows start after it (none: no newline)
            names, inodes = json.loads(data[end + 1 : names_end]), json.loads(data[names_end + 1 : inodes_end])
            if (
                type(names) is not list
                or type(inodes) is not list
                or len(names) != count
                or len(inodes) != count
                or (keys_end == -1) != (count == 0)
            ):
                return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        rows_start = (len(data) if count == 0 else keys_end) + 1
        return cls(names, inodes, location, _vouched_folder(path, crc32), data, crc32, inodes_end + 1, rows_start)

    @staticmethod
    def write(
        path: Path, names: list[str], inodes: list[int], keys: list[str], rows: list[bytes], folder: Identity | None
    ) -> None:
        """Write the columns of a snapshot (rows newest first) atomically; ``folder``: the
        identity of the folder they describe completely, if known."""
        body = b"\n".join([compact_json(names).encode(), compact_json(inodes).encode(), compact_json(keys).encode(), *rows])
        crc32 = zlib.crc32(body)
        header = {"format": _CACHE_FORMAT, "fields": list(CheckpointInfo._fields), "count": len(names), "crc32": crc32}
        atomic_write(path, [compact_json(header).encode(), b"\n", body], durable=False)
        if folder is not None:
            _write_vouch(path, crc32, folder)

    def certify(self, path: Path, folder: Identity) -> None:
        """Record that this snapshot (written at ``path``) describes ``folder`` completely."""
        _write_vouch(path, self.crc32, folder)

    def keys(self) -> list[str]:
        if self._keys is None:
            try:
                keys = json.loads(self.data[self._keys_start : self._rows_start - 1])
            except ValueError:
                raise _BrokenSnapshot from None
            if not isinstance(keys, list) or len(keys) != len(self.names):
                raise _BrokenSnapshot
            self._keys = keys
        return self._keys

    def prepare_maps(self) -> None:
        """Build what :meth:`take_maps` returns now (e.g. while a scan runs on another thread)."""
        if self._maps is None:
            self._maps = (
                dict(zip(self.names, self.inodes, strict=True)),
                dict(zip(self.names, range(len(self.names)), strict=True)),
            )

    def take_maps(self) -> tuple[dict[str, int], dict[str, int]]:
        """({sidecar name: inode}, {sidecar name: row}), handed over to the caller."""
        self.prepare_maps()
        maps, self._maps = self._maps, None
        return maps  # type: ignore[return-value]

    def rows(self) -> list[bytes]:
        """The rows' JSON lines, split from the data the first time they are all needed."""
        if self._rows is None:
            rows = self.data[self._rows_start :].split(b"\n") if self.names else []
            if len(rows) != len(self.names):
                raise _BrokenSnapshot
            self._rows = rows
        return self._rows

    def _row(self, row: int) -> bytes:
        """One row's JSON line, found by walking the lines only as far as it."""
        if self._rows is not None:
            return self._rows[row]
        data, starts = self.data, self._row_starts
        while len(starts) <= row:
            end = data.find(b"\n", starts[-1])
            if end == -1:
                raise _BrokenSnapshot
            starts.append(end + 1)
        end = data.find(b"\n", starts[row])
        return data[starts[row] : len(data) if end == -1 else end]

    def info(self, row: int) -> CheckpointInfo:
        info = self.decoded.get(row)
        if info is None:
            try:
                values = json.loads(self._row(row))  # every field; the location is this index's
                info = CheckpointInfo(*values[:-1], self.location)
            except (ValueError, TypeError, KeyError):
                raise _BrokenSnapshot from None
            if (
                len(values) != len(CheckpointInfo._fields)
                or f"{info.checkpoint_id}.json" != self.names[row]
                or type(info.created_ms) is not int
                or type(info.seq) is not int
            ):
                raise _BrokenSnapshot
            self.decoded[row] = info
        return info


def _vouch_path(snapshot: Path) -> Path:
    return snapshot.with_name(f"{snapshot.stem}.folder{snapshot.suffix}")


def _write_vouch(snapshot: Path, crc32: int, folder: Identity) -> None:
    vouch = {"format": _VOUCH_FORMAT, "crc32": crc32, "folder": list(folder)}
    atomic_write(_vouch_path(snapshot), compact_json(vouch).encode(), durable=False)


def _vouched_folder(snapshot: Path, crc32: int) -> list[int] | None:
    vouch = _read_vouch(snapshot)
    return vouch[1] if vouch is not None and vouch[0] == crc32 else None


def _read_vouch(snapshot: Path) -> tuple[int, list[int]] | None:
    """(crc32 of a snapshot's body, the folder identity vouched for it), if any."""
    try:
        vouch = json.loads(_vouch_path(snapshot).read_bytes())
        crc32, folder = vouch["crc32"], vouch["folder"]
        if vouch["format"] != _VOUCH_FORMAT or type(crc32) is not int or type(folder) is not list or len(folder) != 4:
            return None
        return crc32, folder
    except (OSError, ValueError, TypeError, KeyError):
        return None


class SidecarIndex:
    """Cached sidecars of one folder. ``refresh`` costs one ``stat`` while the folder is
    unchanged (same device, inode, mtime and ctime); otherwise it lists the folder and
    parses only new or replaced sidecars (compared by name and inode: the manager always
    replaces a file by renaming a new one over it). A cold start reuses the snapshot
    ``cache_file`` a previous refresh left for every sidecar whose name and inode still
    match, without even listing the folder while it has the identity the snapshot
    vouches for; snapshot entries are decoded only when a listing returns them, and any
    damage found in the snapshot drops it and rebuilds the index from the sidecars. A
    sidecar edited in place by another tool may keep stale metadata in listings; restore
    and verify always re-read and check it. Not thread-safe: the manager's lock guards it."""

    def __init__(self, folder: Path, location: str, cache_file: Path | None = None) -> None:
        self.folder = folder
        self.location = location
        self.cache_file = cache_file
        self._cache_unused = cache_file is not None
        self._entries: dict[str, CheckpointInfo] = {}  # by checkpoint id: parsed or added (not from the snapshot)
        self._snapshot: _Snapshot | None = None
        self._live: dict[str, int] = {}  # sidecar name -> snapshot row, for rows that still describe the folder
        self._inodes: dict[str, int] = {}  # sidecar name -> inode of every indexed checkpoint
        self._by_key: dict[str, set[str]] | None = None  # key text -> checkpoint ids, built when first needed
        self.unreadable: dict[str, tuple[int, str]] = {}
        self._identity: Identity | None = None  # the folder's, when the index last matched it
        self._settled = False
        self._scan: FolderScan | None = None  # a listing the next refresh may use instead of its own
        self._pending: _Snapshot | None = None  # read by open(), adopted by the first refresh
        self._order: list[Item] | None = None  # newest first, kept up to date by add/remove
        self._decoded = 0  # self._order[: self._decoded] holds no undecoded row

    # -- keeping up with the folder ----------------------------------------------------------
    def open(self) -> FolderScan | None:
        """Start cold: if the folder is exactly what the snapshot says (same identity as
        the tidy, settled scan the snapshot was made from), take the snapshot and return
        None: the folder needs no listing. Otherwise list the folder and return that scan,
        which the first refresh then uses too while the folder does not change."""
        identity = folder_identity(self.folder)
        if self._cache_unused:
            self._cache_unused = False
            vouch = _read_vouch(self.cache_file)  # type: ignore[arg-type]
            scan = None
            if HAS_EXTENSION and (vouch is None or vouch[1] != list(identity)):
                scan = _BackgroundScan(self.folder)  # the folder needs listing: read the snapshot meanwhile
            snapshot = _Snapshot.read(self.cache_file, self.location)  # type: ignore[arg-type]
            if scan is None and snapshot is not None and snapshot.folder == list(identity):
                self._adopt_snapshot(snapshot, None)
                self._identity, self._settled = identity, True
                return None
            self._pending = snapshot
            if scan is not None:
                if snapshot is not None:
                    snapshot.prepare_maps()
                self._scan = scan.result()
                return self._scan
        self._scan = scan_folder(self.folder)
        return self._scan

    def refresh(self) -> None:
        identity = folder_identity(self.folder)
        if self._settled and identity == self._identity:
            return
        if self._cache_unused:  # refreshed without open()
            self._cache_unused = False
            self._pending = _Snapshot.read(self.cache_file, self.location)  # type: ignore[arg-type]
        snapshot, self._pending = self._pending, None
        scan, self._scan = self._scan, None
        if scan is None or scan.identity != identity or not scan.settled:
            scan = scan_folder(self.folder)
        seen = scan.sidecars
        exact = snapshot is not None and self._adopt_snapshot(snapshot, seen)
        parsed = 0
        if not exact and seen != self._inodes:
            gone = [name for name, inode in self._inodes.items() if seen.get(name) != inode]
            if len(gone) > _MERGE_BY_SEARCH:
                self._order = None  # cheaper to sort again than to keep it up to date one by one
            for name in gone:
                self._remove_name(name)
            self.unreadable = {name: bad for name, bad in self.unreadable.items() if seen.get(name) == bad[0]}
            new = [(name, inode) for name, inode in seen.items() if name not in self._inodes and name not in self.unreadable]
            if len(new) > _MERGE_BY_SEARCH:
                self._order = None
            for name, inode in new:
                parsed += 1
                try:
                    self.add(self._read(self.folder / name), inode)
                except CheckpointError as exc:
                    self.unreadable[name] = (inode, str(exc))
                except FileNotFoundError:
                    continue
        self._identity = scan.identity
        self._settled = scan.settled
        if self.cache_file is None:
            return
        if parsed >= _CACHE_AFTER_PARSING or (snapshot is not None and snapshot.folder != list(scan.identity)):
            # a snapshot that can vouch for the whole folder lets the next cold start skip listing it
            complete = scan.settled and not self.unreadable and scan.tidy
            if complete and snapshot is not None and not self._entries and len(self._live) == len(snapshot.names):
                self._certify(snapshot, scan.identity)  # the index is the snapshot: only its header changes
            elif complete or parsed >= _CACHE_AFTER_PARSING:
                self._save_cache(scan.identity if complete else None)

    def invalidate(self) -> None:
        self._settled = False

    def _read(self, path: Path) -> CheckpointInfo:
        body = load_json(path.read_bytes(), path)
        if is_v2_sidecar(body):
            return parse_sidecar(body, path, location=self.location, strict=False)
        return parse_v1_sidecar(body, path, location=self.location)

    # -- the snapshot ----------------------------------------------------------------------
    def _adopt_snapshot(self, snapshot: _Snapshot, seen: dict[str, int] | None) -> bool:
        """Take the snapshot's rows whose sidecar name and inode match ``seen`` (every row
        when ``seen`` is None: the folder is known to be what the snapshot describes).
        True when the index now holds exactly ``seen``."""
        pairs, rows = snapshot.take_maps()
        if len(pairs) != len(snapshot.names):  # a name twice: not a snapshot this module wrote
            return False
        exact = (seen is None or pairs == seen) and not self._inodes
        if exact:  # the usual cold start
            live = rows
            self._inodes = pairs
        else:
            live = {
                name: row
                for row, (name, inode) in enumerate(pairs.items())
                if seen is not None and seen.get(name) == inode and name not in self._inodes
            }
            self._inodes.update((name, snapshot.inodes[row]) for name, row in live.items())
        self._snapshot = snapshot
        self._live = live
        self._order = None
        self._by_key = None
        return exact

    def _drop_snapshot(self) -> None:
        """Forget everything the snapshot said; the next refresh parses those sidecars."""
        for name in self._live:
            del self._inodes[name]
        self._snapshot = None
        self._live = {}
        self._order = None
        self._by_key = None
        self._settled = False

    def _certify(self, snapshot: _Snapshot, folder: Identity) -> None:
        self._write_cache(lambda: snapshot.certify(self.cache_file, folder))  # type: ignore[arg-type]

    def _write_cache(self, write: Callable[[], None]) -> None:
        """``write()`` the snapshot; a failure only warns: listing works without the cache."""
        try:
            write()
        except OSError as exc:
            warnings.warn(f"could not write the checkpoint index cache {self.cache_file}: {exc}", RuntimeWarning, stacklevel=4)

    def _save_cache(self, folder: Identity | None) -> None:
        try:
            order = self._ordered()
            snapshot = self._snapshot
            keys = snapshot.keys() if snapshot is not None and self._live else []
            snapshot_rows = snapshot.rows() if snapshot is not None and self._live else []
        except _BrokenSnapshot:
            return
        names: list[str] = []
        key_texts: list[str] = []
        rows: list[bytes] = []
        for item in order:  # column by column: no object per row (many would keep the cyclic GC busy)
            if type(item) is int:
                names.append(snapshot.names[item])  # type: ignore[union-attr]
                key_texts.append(keys[item])
                rows.append(snapshot_rows[item])
            else:
                info: CheckpointInfo = item  # type: ignore[assignment]
                names.append(f"{info.checkpoint_id}.json")
                key_texts.append(_info_key_text(info))
                rows.append(compact_json(info).encode())
        inodes = [self._inodes[name] for name in names]
        self._write_cache(lambda: _Snapshot.write(self.cache_file, names, inodes, key_texts, rows, folder))  # type: ignore[arg-type]

    def _guarded(self, read: Callable[[], object]) -> object:
        """``read()``; if the snapshot turns out damaged, rebuild from the sidecars and retry."""
        try:
            return read()
        except _BrokenSnapshot:
            self._drop_snapshot()
            self.refresh()
            return read()

    # -- changes ---------------------------------------------------------------------------
    def add(self, info: CheckpointInfo, inode: int) -> None:
        name = f"{info.checkpoint_id}.json"
        if name in self._inodes:
            self._remove_name(name)
        self._entries[info.checkpoint_id] = info
        self._inodes[name] = inode
        if self._by_key is not None:
            self._by_key.setdefault(_info_key_text(info), set()).add(info.checkpoint_id)
        if self._order is not None:
            try:
                position = self._position(self._order, _sort_key(info))
            except _BrokenSnapshot:
                self._order = None
                return
            self._order.insert(position, info)
            if position <= self._decoded:
                self._decoded += 1

    def remove(self, checkpoint_id: str) -> None:
        self._remove_name(f"{checkpoint_id}.json")

    def _remove_name(self, name: str) -> None:
        if self._inodes.pop(name, None) is None:
            return
        checkpoint_id = name[:-5]
        info = self._entries.pop(checkpoint_id, None)
        row = None if info is not None else self._live.pop(name)
        if self._by_key is not None:
            key = _info_key_text(info) if info is not None else self._snapshot.keys()[row]  # type: ignore[union-attr,index]
            self._by_key.get(key, set()).discard(checkpoint_id)
        if self._order is not None:
            try:
                if info is None:
                    info = self._snapshot.info(row)  # type: ignore[union-attr,arg-type]
                position = self._position(self._order, _sort_key(info))
            except _BrokenSnapshot:
                self._order = None
                return
            item = self._order[position] if position < len(self._order) else None
            if item is info or item == row:
                del self._order[position]
                if position < self._decoded:
                    self._decoded -= 1
            else:  # not where its key says: rebuild the order when next needed
                self._order = None

    # -- reading ---------------------------------------------------------------------------
    def select(self, limit: int | None, predicate: Callable[[CheckpointInfo], bool] | None = None) -> list[CheckpointInfo]:
        """Entries newest first (by parsed time and sequence) for which ``predicate``
        holds, at most ``limit`` (None: all)."""
        return self._guarded(lambda: self._select(limit, predicate))  # type: ignore[return-value]

    def _select(self, limit: int | None, predicate: Callable[[CheckpointInfo], bool] | None) -> list[CheckpointInfo]:
        order = self._ordered()
        if predicate is None:
            count = len(order) if limit is None else min(limit, len(order))
            self._decode_upto(count)
            return order[:count]  # type: ignore[return-value]
        found: list[CheckpointInfo] = []
        for index in range(len(order)):
            if index >= self._decoded:
                self._decode_upto(index + _DECODE_BATCH)
            info: CheckpointInfo = order[index]  # type: ignore[assignment]
            if predicate(info):
                found.append(info)
                if len(found) == limit:
                    break
        return found

    def for_key(self, key: SeedKey) -> list[CheckpointInfo]:
        """Every entry of one (layer, kind, seed), in no particular order."""
        return self._guarded(lambda: self._for_key(key))  # type: ignore[return-value]

    def _for_key(self, key: SeedKey) -> list[CheckpointInfo]:
        if self._by_key is None:
            self._by_key = self._build_by_key()
        found = []
        for checkpoint_id in self._by_key.get(_key_text(*key), ()):
            info = self._entries.get(checkpoint_id)
            if info is None:
                info = self._snapshot.info(self._live[f"{checkpoint_id}.json"])  # type: ignore[union-attr]
                if (info.layer_id, info.kind, info.seed_id) != key:
                    raise _BrokenSnapshot
            found.append(info)
        return found

    def _build_by_key(self) -> dict[str, set[str]]:
        by_key: dict[str, set[str]] = {}
        for checkpoint_id, info in self._entries.items():
            by_key.setdefault(_info_key_text(info), set()).add(checkpoint_id)
        if self._live:
            keys = self._snapshot.keys()  # type: ignore[union-attr]
            for name, row in self._live.items():
                by_key.setdefault(keys[row], set()).add(name[:-5])
        return by_key

    # -- the newest-first order ---------------------------------------------------------------
    def _ordered(self) -> list[Item]:
        if self._order is None:
            self._order = self._build_order()
            self._decoded = 0
        return self._order

    def _build_order(self) -> list[Item]:
        extra = newest_first(self._entries.values())
        if not self._live:
            return extra  # type: ignore[return-value]
        snapshot: _Snapshot = self._snapshot  # type: ignore[assignment]
        everything = len(self._live) == len(snapshot.names)
        rows: list[Item] = list(range(len(snapshot.names))) if everything else sorted(self._live.values())
        if len(extra) > _MERGE_BY_SEARCH:
            return newest_first([*extra, *(snapshot.info(row) for row in rows)])  # type: ignore[misc,arg-type]
        for info in extra:
            rows.insert(self._position(rows, _sort_key(info)), info)
        return rows

    def _position(self, order: list[Item], key: tuple[int, int, str]) -> int:
        """Where an entry with sort key ``key`` belongs in the newest-first ``order``."""
        low, high = 0, len(order)
        while low < high:
            middle = (low + high) // 2
            item = order[middle]
            if type(item) is int:
                item = self._snapshot.info(item)  # type: ignore[union-attr]
            if _sort_key(item) > key:  # type: ignore[arg-type]
                low = middle + 1
            else:
                high = middle
        return low

    def _decode_upto(self, count: int) -> None:
        """Decode the snapshot rows among the first ``count`` entries of the order."""
        order = self._order
        end = min(count, len(order))  # type: ignore[arg-type]
        snapshot = self._snapshot
        for index in range(self._decoded, end):
            item = order[index]  # type: ignore[index]
            if type(item) is int:
                order[index] = snapshot.info(item)  # type: ignore[index,union-attr]
        self._decoded = max(self._decoded, end)
