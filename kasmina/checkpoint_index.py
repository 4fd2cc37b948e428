"""The cached metadata index of one checkpoint folder (see :class:`SidecarIndex`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from .checkpoint_errors import CheckpointError
from .checkpoint_format import CheckpointInfo, compact_json, is_v2_sidecar, load_json, parse_sidecar
from .checkpoint_scan import BackgroundScan, FolderScan, Identity, folder_identity, scan_folder, scans_natively
from .checkpoint_snapshot import BrokenSnapshot, Snapshot, read_vouch
from .checkpoint_v1 import parse_v1_sidecar

__all__ = ["SeedKey", "SidecarIndex", "newest_first"]

SeedKey = tuple[str, str, int | None]  # (layer_id, kind, seed_id)
_CACHE_AFTER_PARSING = 256  # a refresh that had to read this many sidecars leaves a snapshot
_DECODE_BATCH = 256  # snapshot rows decoded at a time while a filtered listing walks the order
_MERGE_BY_SEARCH = 64  # up to this many entries besides the snapshot's are inserted by binary search

Item = CheckpointInfo | int  # an entry of the newest-first order: an info, or a snapshot row not decoded yet


def newest_first(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    return sorted(infos, key=_sort_key, reverse=True)


def _sort_key(info: CheckpointInfo) -> tuple[int, int, str]:
    return (info.created_ms, info.seq, info.checkpoint_id)


def _key_text(layer_id: str, kind: str, seed_id: int | None) -> str:
    """A seed key as one string (kind and seed contain no ':', so it is unambiguous)."""
    return f"{kind}:{seed_id}:{layer_id}"


def _info_key_text(info: CheckpointInfo) -> str:
    return _key_text(info.layer_id, info.kind, info.seed_id)


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
        self._snapshot: Snapshot | None = None
        self._live: dict[str, int] = {}  # sidecar name -> snapshot row, for rows that still describe the folder
        self._inodes: dict[str, int] = {}  # sidecar name -> inode of every indexed checkpoint
        self._by_key: dict[str, set[str]] | None = None  # key text -> checkpoint ids, built when first needed
        self.unreadable: dict[str, tuple[int, str]] = {}
        self._identity: Identity | None = None  # the folder's, when the index last matched it
        self._settled = False
        self._scan: FolderScan | None = None  # a listing the next refresh may use instead of its own
        self._pending: Snapshot | None = None  # read by open(), adopted by the first refresh
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
            vouch = read_vouch(self.cache_file)  # type: ignore[arg-type]
            scan = None
            if scans_natively(self.folder) and (vouch is None or vouch[1] != list(identity)):
                scan = BackgroundScan(self.folder)  # the folder needs listing: read the snapshot meanwhile
            snapshot = Snapshot.read(self.cache_file, self.location, vouch)  # type: ignore[arg-type]
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
            self._pending = Snapshot.read(self.cache_file, self.location, read_vouch(self.cache_file))  # type: ignore[arg-type]
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
                self._certify(snapshot, scan.identity)  # the index is the snapshot: only its vouch is written
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
    def _adopt_snapshot(self, snapshot: Snapshot, seen: dict[str, int] | None) -> bool:
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

    def _certify(self, snapshot: Snapshot, folder: Identity) -> None:
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
        except BrokenSnapshot:
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
        self._write_cache(lambda: Snapshot.write(self.cache_file, names, inodes, key_texts, rows, folder))  # type: ignore[arg-type]

    def _guarded(self, read: Callable[[], object]) -> object:
        """``read()``; if the snapshot turns out damaged, rebuild from the sidecars and retry."""
        try:
            return read()
        except BrokenSnapshot:
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
            except BrokenSnapshot:
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
            except BrokenSnapshot:
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
                    raise BrokenSnapshot
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
        snapshot: Snapshot = self._snapshot  # type: ignore[assignment]
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
