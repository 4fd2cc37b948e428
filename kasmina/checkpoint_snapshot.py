"""The snapshot file a checkpoint index leaves for the next cold start (see :class:`Snapshot`)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from .checkpoint_format import CheckpointInfo, compact_json
from .checkpoint_scan import Identity
from .durable_io import atomic_write

__all__ = ["BrokenSnapshot", "Snapshot", "read_vouch"]

_CACHE_FORMAT = "kasmina-checkpoint-index-cache/3"
_VOUCH_FORMAT = "kasmina-checkpoint-index-folder/1"


class BrokenSnapshot(Exception):
    """A snapshot row that does not decode to the checkpoint its name says."""


class Snapshot:
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
        self._keys_start = keys_start  # where the key line starts
        self._row_starts = [rows_start]  # where the rows found so far start (the first: the rows)
        self._rows: list[bytes] | None = None  # split from the data when all are needed
        self._maps: tuple[dict[str, int], dict[str, int]] | None = None

    @classmethod
    def read(cls, path: Path, location: str, vouch: tuple[int, list[int]] | None) -> Snapshot | None:
        """The snapshot in ``path``, or None when it is missing, of another format, or
        damaged in any way; ``vouch``: what :func:`read_vouch` found next to it."""
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
        folder = vouch[1] if vouch is not None and vouch[0] == crc32 else None
        return cls(names, inodes, location, folder, data, crc32, inodes_end + 1, rows_start)

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
                keys = json.loads(self.data[self._keys_start : self._row_starts[0] - 1])
            except ValueError:
                raise BrokenSnapshot from None
            if not isinstance(keys, list) or len(keys) != len(self.names):
                raise BrokenSnapshot
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
            rows = self.data[self._row_starts[0] :].split(b"\n") if self.names else []
            if len(rows) != len(self.names):
                raise BrokenSnapshot
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
                raise BrokenSnapshot
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
                raise BrokenSnapshot from None
            if (
                len(values) != len(CheckpointInfo._fields)
                or f"{info.checkpoint_id}.json" != self.names[row]
                or type(info.created_ms) is not int
                or type(info.seq) is not int
            ):
                raise BrokenSnapshot
            self.decoded[row] = info
        return info


def _vouch_path(snapshot: Path) -> Path:
    return snapshot.with_name(f"{snapshot.stem}.folder{snapshot.suffix}")


def _write_vouch(snapshot: Path, crc32: int, folder: Identity) -> None:
    vouch = {"format": _VOUCH_FORMAT, "crc32": crc32, "folder": list(folder)}
    atomic_write(_vouch_path(snapshot), compact_json(vouch).encode(), durable=False)


def read_vouch(snapshot: Path) -> tuple[int, list[int]] | None:
    """(crc32 of a snapshot's body, the folder identity vouched for it), if any."""
    try:
        vouch = json.loads(_vouch_path(snapshot).read_bytes())
        crc32, folder = vouch["crc32"], vouch["folder"]
        if vouch["format"] != _VOUCH_FORMAT or type(crc32) is not int or type(folder) is not list or len(folder) != 4:
            return None
        return crc32, folder
    except (OSError, ValueError, TypeError, KeyError):
        return None
