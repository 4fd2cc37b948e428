"""The cached metadata index of one checkpoint folder (see :class:`SidecarIndex`)."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from .checkpoint_errors import CheckpointError
from .checkpoint_format import CheckpointInfo, is_v2_sidecar, load_json, parse_sidecar
from .checkpoint_v1 import parse_v1_sidecar
from .durable_io import atomic_write

__all__ = ["SeedKey", "SidecarIndex", "newest_first"]

SeedKey = tuple[str, str, int | None]  # (layer_id, kind, seed_id)
_SETTLE_NS = 100_000_000  # a folder unchanged this long before a scan cannot hide a later change
_CACHE_FORMAT = "kasmina-checkpoint-index-cache/1"
_CACHE_AFTER_PARSING = 256  # a refresh that had to read this many sidecars leaves a snapshot
_INFO_FIELDS = tuple(f for f in CheckpointInfo._fields if f != "location")


class SidecarIndex:
    """Cached sidecars of one folder. ``refresh`` costs one ``stat`` while the folder is
    unchanged; otherwise it lists the folder and parses only new or replaced sidecars
    (compared by name and inode: the manager always replaces a file by renaming a new one
    over it). A cold start reuses the snapshot ``cache_file`` a previous refresh left for
    every sidecar whose name and inode still match. A sidecar edited in place by another
    tool may keep stale metadata in listings; restore and verify always re-read and check
    it. Not thread-safe: the manager's lock guards it."""

    def __init__(self, folder: Path, location: str, cache_file: Path | None = None) -> None:
        self.folder = folder
        self.location = location
        self.cache_file = cache_file
        self._cache_unused = cache_file is not None
        self._entries: dict[str, tuple[CheckpointInfo, int]] = {}
        self._by_key: dict[SeedKey, set[str]] = {}
        self.unreadable: dict[str, tuple[int, str]] = {}
        self._mtime_ns: int | None = None
        self._settled = False
        self._sorted: list[CheckpointInfo] | None = None  # newest first, rebuilt after a change

    def refresh(self) -> None:
        mtime = os.stat(self.folder).st_mtime_ns
        if self._settled and mtime == self._mtime_ns:
            return
        started = time.time_ns()
        seen = {e.name: e.inode() for e in os.scandir(self.folder) if e.name.endswith(".json") and not e.name.startswith(".")}
        for checkpoint_id in [c for c in self._entries if f"{c}.json" not in seen]:
            self.remove(checkpoint_id)
        self.unreadable = {name: bad for name, bad in self.unreadable.items() if seen.get(name) == bad[0]}
        cached = self._load_cache() if self._cache_unused else {}
        self._cache_unused = False
        parsed = 0
        for name, inode in seen.items():
            current = self._entries.get(name[:-5])
            if (current is not None and current[1] == inode) or name in self.unreadable:
                continue
            hit = cached.get(name)
            if hit is not None and hit[0] == inode:
                self.add(hit[1], inode)
                continue
            parsed += 1
            try:
                self.add(self._read(self.folder / name), inode)
            except CheckpointError as exc:
                self.unreadable[name] = (inode, str(exc))
            except FileNotFoundError:
                continue
        self._mtime_ns = mtime
        self._settled = started - mtime > _SETTLE_NS
        if parsed >= _CACHE_AFTER_PARSING:
            self._save_cache()

    def _load_cache(self) -> dict[str, tuple[int, CheckpointInfo]]:
        """The snapshot a previous manager left: {sidecar name: (inode, info)}. Used only
        for sidecars whose name and inode still match; any problem means no snapshot."""
        try:
            body = json.loads(self.cache_file.read_bytes())  # type: ignore[union-attr]
            if body.get("format") != _CACHE_FORMAT or body.get("fields") != list(_INFO_FIELDS):
                return {}
            return {name: (inode, CheckpointInfo(*values, self.location)) for name, inode, values in body["entries"]}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def _save_cache(self) -> None:
        entries = [
            [f"{info.checkpoint_id}.json", inode, [getattr(info, f) for f in _INFO_FIELDS]]
            for info, inode in self._entries.values()
        ]
        body = {"format": _CACHE_FORMAT, "fields": list(_INFO_FIELDS), "entries": entries}
        try:
            atomic_write(self.cache_file, json.dumps(body, separators=(",", ":")).encode(), durable=False)  # type: ignore[arg-type]
        except OSError as exc:  # only a cache: listing works without it
            warnings.warn(f"could not write the checkpoint index cache {self.cache_file}: {exc}", RuntimeWarning, stacklevel=2)

    def _read(self, path: Path) -> CheckpointInfo:
        body = load_json(path.read_bytes(), path)
        if is_v2_sidecar(body):
            return parse_sidecar(body, path, location=self.location, strict=False)
        return parse_v1_sidecar(body, path, location=self.location)

    def invalidate(self) -> None:
        self._settled = False

    def add(self, info: CheckpointInfo, inode: int) -> None:
        if info.checkpoint_id in self._entries:
            self.remove(info.checkpoint_id)
        self._sorted = None
        self._entries[info.checkpoint_id] = (info, inode)
        self._by_key.setdefault((info.layer_id, info.kind, info.seed_id), set()).add(info.checkpoint_id)

    def remove(self, checkpoint_id: str) -> None:
        entry = self._entries.pop(checkpoint_id, None)
        if entry is not None:
            self._sorted = None
            info = entry[0]
            self._by_key.get((info.layer_id, info.kind, info.seed_id), set()).discard(checkpoint_id)

    def get(self, checkpoint_id: str) -> CheckpointInfo | None:
        entry = self._entries.get(checkpoint_id)
        return None if entry is None else entry[0]

    def newest_first(self) -> list[CheckpointInfo]:
        """Every entry, newest first (cached until the next change)."""
        if self._sorted is None:
            self._sorted = newest_first(info for info, _ in self._entries.values())
        return self._sorted

    def for_key(self, key: SeedKey) -> list[CheckpointInfo]:
        return [self._entries[c][0] for c in self._by_key.get(key, ())]


def newest_first(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    return sorted(infos, key=lambda i: (i.created_ms, i.seq, i.checkpoint_id), reverse=True)
