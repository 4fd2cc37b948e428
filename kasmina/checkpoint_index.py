"""The cached metadata index of one checkpoint folder (see :class:`SidecarIndex`)."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .checkpoint_errors import CheckpointError
from .checkpoint_format import CheckpointInfo, compact_json, is_v2_sidecar, load_json, parse_sidecar
from .checkpoint_v1 import parse_v1_sidecar
from .durable_io import TEMP_PREFIX, atomic_write

__all__ = ["FolderScan", "SeedKey", "SidecarIndex", "folder_identity", "newest_first", "scan_folder"]

SeedKey = tuple[str, str, int | None]  # (layer_id, kind, seed_id)
_SETTLE_NS = 100_000_000  # a folder unchanged this long before a scan cannot hide a later change
# Folder times in whole seconds mean a file system that keeps no finer ones (ext4 with small
# inodes, HFS+, FAT: 1-2 s), where a change within the same second keeps them.
_COARSE_SETTLE_NS = 3_000_000_000
_CACHE_FORMAT = "kasmina-checkpoint-index-cache/2"
_CACHE_AFTER_PARSING = 256  # a refresh that had to read this many sidecars leaves a snapshot
_DECODE_BATCH = 256  # snapshot rows decoded at a time while a filtered listing walks the order
_MERGE_BY_SEARCH = 64  # up to this many entries besides the snapshot's are inserted by binary search

# in "/name/name/.../": temp files, stems of payloads and of sidecars (those listed: no leading dot)
_TEMP_NAMES = re.compile(f"(?<=/)({re.escape(TEMP_PREFIX)}[^/]*)(?=/)")
_PAYLOAD_STEMS = re.compile(r"(?<=/)([^/]*)\.(?:safetensors|pt)(?=/)")
_SIDECAR_STEMS = re.compile(r"(?<=/)([^/.][^/]*)\.json(?=/)")
Identity = tuple[int, int, int, int]  # a folder's (device, inode, mtime_ns, ctime_ns)
Item = CheckpointInfo | int  # an entry of the newest-first order: an info, or a snapshot row not decoded yet


@dataclass(frozen=True)
class FolderScan:
    """One listing of a folder: every name, and the inode of each sidecar (``*.json``).
    ``identity`` is the folder's (device, inode, mtime, ctime) read just before the
    listing started at ``started_ns``."""

    identity: Identity
    started_ns: int
    names: list[str]
    sidecars: dict[str, int]

    @property
    def settled(self) -> bool:
        """True when no change made after this scan can leave the folder's mtime and ctime
        as they were (timestamps are coarse: a change right after another may keep them)."""
        mtime, ctime = self.identity[2], self.identity[3]
        whole_seconds = mtime % 1_000_000_000 == 0 and ctime % 1_000_000_000 == 0
        return self.started_ns - max(mtime, ctime) > (_COARSE_SETTLE_NS if whole_seconds else _SETTLE_NS)

    @cached_property
    def _joined(self) -> str:
        return f"/{'/'.join(self.names)}/"  # '/' is the one character no file name holds

    def temp_names(self) -> list[str]:
        """The names that look like temp files of :mod:`kasmina.durable_io`."""
        return _TEMP_NAMES.findall(self._joined) if f"/{TEMP_PREFIX}" in self._joined else []

    def is_tidy(self) -> bool:
        """No temp files, and every sidecar has its payload and every payload its sidecar
        (one of each per checkpoint)."""
        if self.temp_names():
            return False
        text = self._joined
        payloads = _PAYLOAD_STEMS.findall(text)
        return len(payloads) == len(self.sidecars) and set(payloads) == set(_SIDECAR_STEMS.findall(text))


def folder_identity(folder: str | os.PathLike[str]) -> Identity:
    """(device, inode, mtime, ctime) of a folder: any entry added, removed or renamed in
    it changes the times (and a folder swapped for another changes the inode)."""
    st = os.stat(folder)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def scan_folder(folder: str | os.PathLike[str]) -> FolderScan:
    """List ``folder`` once (one pass over its entries, inodes from the listing itself)."""
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
    return FolderScan(identity, started, names, sidecars)


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

    File layout (UTF-8 text): a JSON header line ``{format, fields, count, crc32,
    folder}``, then the JSON array of sidecar names, the JSON array of their inodes, the
    JSON array of their seed keys, then one JSON array of field values per row (its
    location is ignored: it is the index's own). ``crc32`` covers everything after the
    header line. ``folder`` is the folder's identity when the rows were taken from a
    settled scan of a tidy folder (see :meth:`FolderScan.is_tidy`), else null: while the
    folder still has that identity, the rows are exactly its sidecars and the folder
    needs no listing."""

    __slots__ = ("_key_line", "_keys", "body", "decoded", "folder", "inodes", "location", "names", "rows")

    def __init__(
        self,
        names: list[str],
        inodes: list[int],
        key_line: str,
        rows: list[str],
        location: str,
        folder: list[int] | None,
        body: bytes,
    ) -> None:
        self.body = body  # the file after its header line, as read
        self.folder = folder
        self.names = names
        self.inodes = inodes
        self.rows = rows
        self.location = location
        self.decoded: dict[int, CheckpointInfo] = {}
        self._key_line = key_line
        self._keys: list[str] | None = None

    @classmethod
    def read(cls, path: Path, location: str) -> _Snapshot | None:
        """The snapshot in ``path``, or None when it is missing, of another format, or
        damaged in any way."""
        try:
            data = path.read_bytes()
            end = data.index(b"\n")
            header = json.loads(data[:end])
            body = data[end + 1 :]
            if (
                header.get("format") != _CACHE_FORMAT
                or header.get("fields") != list(CheckpointInfo._fields)
                or header.get("crc32") != zlib.crc32(body)
            ):
                return None
            lines = body.decode().split("\n")
            count = header["count"]
            names, inodes = json.loads(lines[0]), json.loads(lines[1])
            if len(lines) != count + 3 or len(names) != count or len(inodes) != count:
                return None
            folder = header.get("folder")
            if folder is not None and (type(folder) is not list or len(folder) != 4):
                return None
            return cls(names, inodes, lines[2], lines[3:], location, folder, body)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    @staticmethod
    def write(path: Path, names: list[str], inodes: list[int], keys: list[str], rows: list[str], folder: Identity | None) -> None:
        """Write the columns of a snapshot (rows newest first) atomically; ``folder``: the
        identity of the folder they describe completely, if known."""
        body = "\n".join([compact_json(names), compact_json(inodes), compact_json(keys), *rows]).encode()
        _Snapshot._write_body(path, body, len(names), folder)

    def certify(self, path: Path, folder: Identity) -> None:
        """Rewrite this snapshot unchanged but for ``folder``: it describes that folder completely."""
        _Snapshot._write_body(path, self.body, len(self.names), folder)

    @staticmethod
    def _write_body(path: Path, body: bytes, count: int, folder: Identity | None) -> None:
        header = {
            "format": _CACHE_FORMAT,
            "fields": list(CheckpointInfo._fields),
            "count": count,
            "crc32": zlib.crc32(body),
            "folder": None if folder is None else list(folder),
        }
        atomic_write(path, [compact_json(header).encode(), b"\n", body], durable=False)

    def keys(self) -> list[str]:
        if self._keys is None:
            try:
                keys = json.loads(self._key_line)
            except ValueError:
                raise _BrokenSnapshot from None
            if not isinstance(keys, list) or len(keys) != len(self.names):
                raise _BrokenSnapshot
            self._keys = keys
        return self._keys

    def info(self, row: int) -> CheckpointInfo:
        info = self.decoded.get(row)
        if info is None:
            try:
                values = json.loads(self.rows[row])  # every field; the location is this index's
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
            snapshot = _Snapshot.read(self.cache_file, self.location)  # type: ignore[arg-type]
            if snapshot is not None and snapshot.folder == list(identity):
                self._adopt_snapshot(snapshot, None)
                self._identity, self._settled = identity, True
                return None
            self._pending = snapshot
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
        if snapshot is not None:
            self._adopt_snapshot(snapshot, seen)
        parsed = 0
        if seen != self._inodes:
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
            complete = scan.settled and not self.unreadable and scan.is_tidy()
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
    def _adopt_snapshot(self, snapshot: _Snapshot, seen: dict[str, int] | None) -> None:
        """Take the snapshot's rows whose sidecar name and inode match ``seen`` (every row
        when ``seen`` is None: the folder is known to be what the snapshot describes)."""
        pairs = dict(zip(snapshot.names, snapshot.inodes, strict=True))
        if len(pairs) != len(snapshot.names):  # a name twice: not a snapshot this module wrote
            return
        if (seen is None or pairs == seen) and not self._inodes:  # the usual cold start
            live = dict(zip(snapshot.names, range(len(pairs)), strict=True))
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
        except _BrokenSnapshot:
            return
        names: list[str] = []
        key_texts: list[str] = []
        rows: list[str] = []
        for item in order:  # column by column: no object per row (many would keep the cyclic GC busy)
            if type(item) is int:
                names.append(snapshot.names[item])  # type: ignore[union-attr]
                key_texts.append(keys[item])
                rows.append(snapshot.rows[item])  # type: ignore[union-attr]
            else:
                info: CheckpointInfo = item  # type: ignore[assignment]
                names.append(f"{info.checkpoint_id}.json")
                key_texts.append(_info_key_text(info))
                rows.append(compact_json(info))
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
