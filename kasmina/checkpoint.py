"""Crash-safe checkpoints: :class:`CheckpointManager` and :class:`CheckpointRecovery`.

Layout::

    checkpoint_dir/active/<id>.safetensors   payload (no pickle)
    checkpoint_dir/active/<id>.json          sidecar, version 2: the commit record
    checkpoint_dir/archive/...               older low/normal checkpoints moved by retention

Ids are ``{layer}_seed{seed}_{ms}_{seq}`` (a whole layer: ``{layer}_layer_{ms}_{seq}``)
with a per-process sequence; the final names are claimed with a no-overwrite hard link,
so two threads or processes can never overwrite each other's checkpoint, even in the same
millisecond (a clash just takes the next sequence number). A save writes both files to
temp files (unnamed ones where the system allows: nothing is left behind by a crash),
fsyncs them, links the payload and then the sidecar into place and fsyncs the folder
(in one native call of ``kasmina._fileio`` on Linux, else with :mod:`kasmina.durable_io`);
only then is anything moved by retention. A
checkpoint exists once its sidecar does; a payload without sidecar is an unfinished
save. Every restore checks the payload's size and sha256 and the sidecar's own
checksum, and names the damaged file when one fails. ``durable=False`` skips every
fsync: faster, still atomic for readers, but **not crash-safe** (scratch data, tests).

Each seed checkpoint also gets ``number``, a per-(layer, seed) sequence starting at 1,
stored in the sidecar: the stable int32 that goes into a seed's CHECKPOINT_ID column
(:meth:`CheckpointManager.get_checkpoint_by_number` maps it back). Numbers continue from
the highest one in ``active/`` for that seed; they are unique when one process writes a
given seed (two processes writing the same seed may share a number, and a lookup then
returns the newest).
"""

from __future__ import annotations

import errno as _errno
import hashlib
import itertools
import operator
import os
import queue
import re
import secrets
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._extension import FILEIO
from ._generated.lifecycle_tables import StateColumn
from .checkpoint_errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    UnsafeCheckpointError,
)
from .checkpoint_format import (
    BACKGROUND_HASH_BYTES,
    PRIORITIES,
    CheckpointInfo,
    EncodedPayload,
    build_sidecar,
    decode_payload,
    encode_payload,
    is_v2_sidecar,
    lifecycle_state_of,
    load_json,
    parse_sidecar,
    sha256_hex,
)
from .checkpoint_index import SeedKey, SidecarIndex, newest_first
from .checkpoint_scan import FolderScan
from .checkpoint_v1 import V1_ID_RE, info_from_v1, load_v1, parse_v1_sidecar
from .durable_io import (
    TempFile,
    anonymous_files_possible,
    atomic_write,
    clean_stale_temps,
    fsync_dir,
    is_temp_name,
    no_anonymous_files,
    open_dir,
)

if TYPE_CHECKING:
    from .state import ExtendedStateTensor

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointRecovery",
    "CheckpointWriteError",
    "RecoveryResult",
    "SkippedCheckpoint",
    "TransitionCheckpoint",
    "UnsafeCheckpointError",
    "checkpoint_after_transition",
    "validate_layer_id",
]

_LAYER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_CHECKPOINT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\Z")
_SEED_ID_RE = re.compile(r"^(?P<layer>.+)_seed(?P<seed>\d+)_(?P<ms>\d+)_(?P<seq>\d+)\Z")
_LAYER_CKPT_RE = re.compile(r"^(?P<layer>.+)_layer_(?P<ms>\d+)_(?P<seq>\d+)\Z")
_PAYLOAD_EXTS = (".safetensors", ".pt")
_RETAINED = ("low", "normal")  # priorities subject to retention
_INT32_MAX = 2**31 - 1
_MAX_ID_ATTEMPTS = 1000
_CHECKPOINT_COLUMN = int(StateColumn.CHECKPOINT_ID)
_LIFECYCLE_COLUMN = int(StateColumn.LIFECYCLE_STATE)
_SEED_ROW_PARTS = {"state": "row", "history": "history", "history_count": "history_count", "metrics": "metrics"}


# ---- ids ---------------------------------------------------------------------------------
class _IdClock:
    """Per-process (milliseconds, sequence) pairs, strictly increasing in that order. The
    sequence starts at a random point in each process (a forked child draws its own), so
    that two processes saving one seed in one millisecond do not draw the same ids: a
    clash in ``active/`` would only cost a retry, but one with an id already archived
    would go unnoticed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._seq = secrets.randbits(40)

    def next(self) -> tuple[int, int]:
        with self._lock:
            self._last_ms = max(time.time_ns() // 1_000_000, self._last_ms)
            self._seq += 1
            return self._last_ms, self._seq

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self._seq = secrets.randbits(40)


_CLOCK = _IdClock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CLOCK.after_fork)


def _make_id(layer_id: str, kind: str, seed_id: int | None, ms: int, seq: int) -> str:
    return f"{layer_id}_seed{seed_id}_{ms}_{seq}" if kind == "seed" else f"{layer_id}_layer_{ms}_{seq}"


def _describe(key: SeedKey) -> str:
    """A key in words: ``layer 'enc' seed 5`` or ``layer 'enc' (whole layer)``."""
    return f"layer {key[0]!r}" + (f" seed {key[2]}" if key[1] == "seed" else " (whole layer)")


def _id_readings(checkpoint_id: str) -> list[tuple[SeedKey, tuple[int, int]]]:
    """Every (key, (ms, seq)) a checkpoint id can be read as: one name can fit several
    forms (the v1 id of layer ``enc_layer`` seed 5 reads as a v2 whole-layer id of layer
    ``enc`` too); what the file holds decides which it is."""
    readings: list[tuple[SeedKey, tuple[int, int]]] = []
    if match := _SEED_ID_RE.match(checkpoint_id):
        readings.append(((match["layer"], "seed", int(match["seed"])), (int(match["ms"]), int(match["seq"]))))
    if match := _LAYER_CKPT_RE.match(checkpoint_id):
        readings.append(((match["layer"], "layer", None), (int(match["ms"]), int(match["seq"]))))
    if match := V1_ID_RE.match(checkpoint_id):
        readings.append(((match["layer"], "seed", int(match["seed"])), (int(match["ms"]), 0)))
    return readings


# ---- validation --------------------------------------------------------------------------
_VALID_LAYER_IDS: set[str] = set()  # layer ids checked already (the first few thousand)


def _check_layer_id(layer_id: Any) -> str:
    if type(layer_id) is str and layer_id in _VALID_LAYER_IDS:
        return layer_id
    if not isinstance(layer_id, str) or not _LAYER_ID_RE.match(layer_id):
        raise ValueError(
            f"layer_id {layer_id!r} is not allowed: use 1-128 characters from A-Z a-z 0-9 _ . - , "
            "starting with a letter or digit (no path separators)"
        )
    if type(layer_id) is str and len(_VALID_LAYER_IDS) < 4096:
        _VALID_LAYER_IDS.add(layer_id)
    return layer_id


def _check_seed_id(seed_id: Any) -> int:
    try:
        if isinstance(seed_id, bool):
            raise TypeError
        value = operator.index(seed_id)
    except TypeError:
        raise TypeError(f"seed_id must be an integer, got {seed_id!r}") from None
    if not 0 <= value <= _INT32_MAX:
        raise ValueError(f"seed_id {value} is out of range 0..{_INT32_MAX}")
    return value


def _check_priority(priority: Any) -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r} is not one of {', '.join(PRIORITIES)}")
    return priority


def _check_checkpoint_id(checkpoint_id: Any) -> str:
    if not isinstance(checkpoint_id, str) or not _CHECKPOINT_ID_RE.match(checkpoint_id):
        raise ValueError(f"checkpoint id {checkpoint_id!r} is not a valid checkpoint id (no path separators allowed)")
    return checkpoint_id


def _device(target_device: Any) -> torch.device | None:
    if target_device is None:
        return None
    try:
        return torch.device(target_device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"target_device {target_device!r} is not a device: {exc}") from None


# ---- manager -----------------------------------------------------------------------------
class CheckpointManager:
    """Saves, lists, verifies, restores, retires and migrates checkpoints in one folder.

    ``max_checkpoints_per_seed``: how many ``low``/``normal`` checkpoints per seed stay in
    ``active/``; older ones are moved to ``archive/`` after each save. ``high`` and
    ``critical`` ones always stay. ``durable=False`` skips fsyncs (unsafe on power loss).
    Thread-safe; several processes may share one folder (their ids never collide). Save
    each seed through one manager: retention and the per-seed numbers count the
    checkpoints this manager saved or found when it last listed the folder, so two
    managers saving the same seed would each keep their own newest ones and number them
    independently."""

    def __init__(self, checkpoint_dir: str | os.PathLike[str], max_checkpoints_per_seed: int = 5, durable: bool = True) -> None:
        if (
            isinstance(max_checkpoints_per_seed, bool)
            or not isinstance(max_checkpoints_per_seed, int)
            or max_checkpoints_per_seed < 1
        ):
            raise ValueError(f"max_checkpoints_per_seed must be a positive integer, got {max_checkpoints_per_seed!r}")
        if not isinstance(durable, bool):
            raise TypeError(f"durable must be True or False, got {durable!r}")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_checkpoints_per_seed = max_checkpoints_per_seed
        self.durable = durable
        self.active_dir = self.checkpoint_dir / "active"
        self.archive_dir = self.checkpoint_dir / "archive"
        self._active_path, self._archive_path = os.fspath(self.active_dir), os.fspath(self.archive_dir)
        self._active_bytes, self._archive_bytes = os.fsencode(self._active_path), os.fsencode(self._archive_path)
        self._make_folders()
        self._lock = threading.RLock()
        self._active = SidecarIndex(self.active_dir, "active", self.checkpoint_dir / ".index-cache-active.json")
        self._archive = SidecarIndex(self.archive_dir, "archive")
        self._numbers: dict[SeedKey, int] = {}
        self._commits = 0  # saves committed: a native save that saw others commit meanwhile rechecks retention
        # per state tensor and seed: the token of the last row copy or restore; a save
        # writes CHECKPOINT_ID only while its copy is still the newest
        self._row_tokens: weakref.WeakKeyDictionary[ExtendedStateTensor, dict[int, int]] = weakref.WeakKeyDictionary()
        self._next_token = itertools.count(1).__next__
        active = self._active.open()  # None: active/ is exactly as a tidy listing left it, nothing to clean or finish
        archived = self._archive.open()
        assert archived is not None  # archive/ has no snapshot, so open() always lists it
        self.cleaned_temp_files = [
            *clean_stale_temps(self.checkpoint_dir),
            *(clean_stale_temps(self.active_dir, active.temp_names()) if active is not None else ()),
            *clean_stale_temps(self.archive_dir, archived.temp_names()),
        ]
        if active is not None:
            self._finish_interrupted_moves(active, archived)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its arguments: unpickling opens the folder afresh."""
        return (type(self), (self.checkpoint_dir, self.max_checkpoints_per_seed, self.durable))

    def __deepcopy__(self, memo: dict[int, Any]) -> CheckpointManager:
        """A manager is a handle on a folder: a deep copy of what holds it shares it."""
        return self

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.checkpoint_dir)!r}, "
            f"max_checkpoints_per_seed={self.max_checkpoints_per_seed}, durable={self.durable})"
        )

    # -- saving ----------------------------------------------------------------------------
    def save_checkpoint(
        self,
        layer_id: str,
        seed_id: int,
        state_data: Mapping[str, Any],
        blueprint_state: Mapping[str, Any] | None = None,
        priority: str = "normal",
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Save one seed's checkpoint durably and return its id.

        ``state_data``: a dict of tensors and plain values (``lifecycle_state`` is
        recorded in the sidecar when present); ``blueprint_state``: e.g. a blueprint's
        ``state_dict()``; ``metadata``: free-form plain values. Tensors must not be
        modified while the call runs. Raises ``ValueError``/``TypeError`` for bad input
        (nothing written) and :class:`CheckpointWriteError` when the disk refuses (e.g.
        ENOSPC): nothing of the failed save remains, earlier checkpoints are intact."""
        layer_id = _check_layer_id(layer_id)
        seed_id = _check_seed_id(seed_id)
        priority = _check_priority(priority)
        if not isinstance(state_data, Mapping):
            raise TypeError(f"state_data must be a dict, got {type(state_data).__name__}")
        if blueprint_state is not None and not isinstance(blueprint_state, Mapping):
            raise TypeError(f"blueprint_state must be a dict (e.g. a state_dict()) or None, got {type(blueprint_state).__name__}")
        lifecycle = lifecycle_state_of(state_data.get("lifecycle_state"))
        payload = encode_payload({"state_data": state_data, "blueprint_state": blueprint_state, "metadata": dict(metadata or {})})
        key = (layer_id, "seed", seed_id)
        return self._commit(key, priority, lifecycle, payload, self._next_number(key)).checkpoint_id

    def save_layer_state(
        self,
        layer_id: str,
        state: ExtendedStateTensor,
        blueprints: Mapping[str, torch.Tensor] | None = None,
        priority: str = "normal",
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Save a whole layer (every seed's state plus the blueprint tensors) as one
        checkpoint ``{layer}_layer_{ms}_{seq}`` and return its id: the way to checkpoint
        a million seeds. Retention applies per layer as it does per seed."""
        layer_id = _check_layer_id(layer_id)
        priority = _check_priority(priority)
        if not hasattr(state, "state_dict"):
            raise TypeError(f"state must be an ExtendedStateTensor, got {type(state).__name__}")
        blueprints = dict(blueprints or {})
        for name, tensor in blueprints.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"blueprints[{name!r}] must be a tensor, got {type(tensor).__name__}")
        payload = encode_payload({"state": dict(state.state_dict()), "blueprints": blueprints, "metadata": dict(metadata or {})})
        key = (layer_id, "layer", None)
        return self._commit(key, priority, None, payload, self._next_number(key)).checkpoint_id

    def _commit(self, key: SeedKey, priority: str, lifecycle: int | None, payload: EncodedPayload, number: int) -> CheckpointInfo:
        """Write, sync and publish one checkpoint, then apply retention. Both files are
        written (the sidecar's write-back started: the payload fsync's journal commit then
        takes it along) before either is fsynced; both are fsynced before either is linked
        under its final name (never replacing a file), and the folder fsync makes the
        names durable. The temp files are unnamed where the system allows, so a crash
        leaves nothing to clean up. The system calls are made by the native
        ``kasmina._fileio`` where it is built and the folder takes unnamed files (payloads
        below :data:`BACKGROUND_HASH_BYTES`: larger ones are hashed while written), and by
        :meth:`_commit_python` otherwise; both write the same files."""
        if FILEIO is not None and payload.size < BACKGROUND_HASH_BYTES and anonymous_files_possible(self._active_path):
            info = self._commit_native(key, priority, lifecycle, payload, number)
            if info is not None:
                return info
        return self._commit_python(key, priority, lifecycle, payload, number)

    def _new_info(
        self, key: SeedKey, priority: str, lifecycle: int | None, payload: EncodedPayload, number: int
    ) -> CheckpointInfo:
        """The record of a checkpoint about to be written, under a fresh id."""
        ms, seq = _CLOCK.next()
        checkpoint_id = _make_id(key[0], key[1], key[2], ms, seq)
        return CheckpointInfo(
            checkpoint_id=checkpoint_id,
            kind=key[1],
            layer_id=key[0],
            seed_id=key[2],
            number=number,
            created_ms=ms,
            seq=seq,
            timestamp=ms / 1000,
            priority=priority,
            lifecycle_state=lifecycle,
            payload_file=f"{checkpoint_id}.safetensors",
            payload_size=payload.size,
            sha256=payload.sha256,
            version=2,
        )

    def _commit_native(
        self, key: SeedKey, priority: str, lifecycle: int | None, payload: EncodedPayload, number: int
    ) -> CheckpointInfo | None:
        """:meth:`_commit` in one native call: write, sync, publish, then retention's moves
        (chosen beforehand, as if the new checkpoint were listed already). None when the
        folder cannot link unnamed files after all (nothing written)."""
        folder, archive = self._active_bytes, self._archive_bytes  # paths as bytes: any the file system takes
        with self._lock:
            victims = self._retention_victims(key, adding=True) if priority in _RETAINED else []
            commits_seen = self._commits
        moves = tuple(_archive_move(folder, archive, victim) for victim in victims)
        for _ in range(_MAX_ID_ATTEMPTS):
            info = self._new_info(key, priority, lifecycle, payload, number)
            checkpoint_id = info.checkpoint_id
            try:
                outcome = FILEIO.commit_pair(  # type: ignore[union-attr]
                    folder, payload.chunks, build_sidecar(info), f"{checkpoint_id}.safetensors".encode(),
                    f"{checkpoint_id}.json".encode(), self.durable, moves,
                )  # fmt: skip
            except OSError as exc:
                raise self._write_error(exc, exc.stage, key) from exc  # type: ignore[attr-defined]
            if type(outcome) is tuple:  # (sidecar inode, failed moves)
                break
            if outcome == FILEIO.NO_ANONYMOUS:  # type: ignore[union-attr]
                no_anonymous_files(self._active_path)
                return None
            # NAME_TAKEN: another process or a stray file holds this id; try the next one
        else:
            raise CheckpointWriteError(f"could not find a free checkpoint id in {self.active_dir} after {_MAX_ID_ATTEMPTS} tries")
        inode, move_errors = outcome
        failed = dict(move_errors)
        with self._lock:
            self._active.add(info, inode)
            for index, victim in enumerate(victims):
                if index not in failed:
                    self._active.remove(victim.checkpoint_id)
            self._active.invalidate()
            if victims:
                self._archive.invalidate()
            # another save committed since the victims were chosen: it may have added one more
            late = self._retention_victims(key) if self._commits != commits_seen and priority in _RETAINED else []
            self._commits += 1
        self._archive_all(late)
        for index, code in failed.items():
            _warn_unarchived(victims[index], OSError(code, os.strerror(code)))
        return info

    def _commit_python(
        self, key: SeedKey, priority: str, lifecycle: int | None, payload: EncodedPayload, number: int
    ) -> CheckpointInfo:
        """:meth:`_commit` made of :mod:`kasmina.durable_io` calls."""
        folder = self._active_path
        durable = self.durable
        temps: list[TempFile] = []  # written, not published
        linked: list[str] = []  # names published by this call
        dir_fd: int | None = None
        stage = "opening the folder"
        try:
            dir_fd = open_dir(folder)
            stage = "writing the payload"
            payload_temp = TempFile(folder, "payload", anonymous=True)
            temps.append(payload_temp)
            payload.hash_in_background()
            payload_temp.write(payload.chunks)
            for _ in range(_MAX_ID_ATTEMPTS):
                stage = "writing the sidecar"
                info = self._new_info(key, priority, lifecycle, payload, number)
                checkpoint_id = info.checkpoint_id
                sidecar_temp = TempFile(folder, "sidecar", anonymous=True)
                temps.append(sidecar_temp)
                sidecar_temp.write((build_sidecar(info),))
                if durable:
                    sidecar_temp.start_writeback()
                    stage = "syncing the payload and sidecar"
                    payload_temp.sync()
                    sidecar_temp.sync()
                stage = "publishing the checkpoint"
                try:
                    payload_temp.link(dir_fd, info.payload_file)
                except FileExistsError:  # another process took this id: try the next one
                    temps.pop().discard()
                    continue
                linked.append(info.payload_file)
                sidecar_name = f"{checkpoint_id}.json"
                try:
                    sidecar_temp.link(dir_fd, sidecar_name)
                except FileExistsError:  # a stray sidecar holds this id: take the payload back, try the next one
                    payload_temp.unlink(dir_fd, linked[-1])
                    linked.pop()
                    temps.pop().discard()
                    continue
                linked.append(sidecar_name)
                inode = sidecar_temp.inode()  # after the link: a named copy may have taken the file's place
                if durable:
                    stage = "syncing the folder"
                    os.fsync(dir_fd)
                break
            else:
                raise CheckpointWriteError(f"could not find a free checkpoint id in {folder} after {_MAX_ID_ATTEMPTS} tries")
        except BaseException as exc:
            _remove_quietly(f"{folder}/{name}" for name in reversed(linked))
            if isinstance(exc, OSError):
                raise self._write_error(exc, stage, key) from exc
            raise
        finally:
            for temp in temps:
                temp.discard()  # closes them; after the links, drops a named temp's own name
            if dir_fd is not None:
                try:
                    os.close(dir_fd)
                except OSError:
                    pass  # a read-only folder descriptor: nothing of the save depends on closing it
        with self._lock:
            self._active.add(info, inode)
            self._active.invalidate()
            self._commits += 1
            # after the add, under the same lock: concurrent saves of a seed each see the others
            victims = self._retention_victims(key) if priority in _RETAINED else []
        self._archive_all(victims)
        return info

    def _next_number(self, key: SeedKey) -> int:
        with self._lock:
            if key not in self._numbers:  # first save of this seed here: learn the numbers already on disk
                self._active.refresh()
            number = max([self._numbers.get(key, 0), *(i.number for i in self._active.for_key(key))]) + 1
            if number > _INT32_MAX:
                raise CheckpointError(f"layer {key[0]!r} seed {key[2]}: checkpoint numbers exhausted (int32)")
            self._numbers[key] = number
            return number

    def _write_error(self, exc: OSError, stage: str, key: SeedKey) -> CheckpointWriteError:
        if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
            reason = "no space left on device" if exc.errno == _errno.ENOSPC else "disk quota exceeded"
        else:
            reason = exc.strerror or str(exc)
        return CheckpointWriteError(
            f"cannot save the checkpoint of {_describe(key)}: {reason} while {stage} in {self.active_dir}; "
            "nothing of this save was kept and earlier checkpoints are intact",
            exc.errno,
        )

    # -- retention, deletion ---------------------------------------------------------------
    def _retention_victims(self, key: SeedKey, adding: bool = False) -> list[CheckpointInfo]:
        """The ``low``/``normal`` checkpoints of ``key`` older than its newest
        ``max_checkpoints_per_seed``: what retention moves (the caller holds the lock).
        ``adding``: count one more, newer than all listed (the one about to be saved)."""
        keep = self.max_checkpoints_per_seed - adding
        candidates = [i for i in self._active.for_key(key) if i.priority in _RETAINED and i.version == 2]
        if len(candidates) <= keep:
            return []
        return newest_first(candidates)[keep:]

    def _archive_all(self, victims: list[CheckpointInfo]) -> None:
        for info in victims:
            try:
                self._move(info.checkpoint_id, info.payload_file, self._active_path, self._archive_path)
            except OSError as exc:  # the save itself succeeded; retention retries next time
                _warn_unarchived(info, exc)

    def _move(self, checkpoint_id: str, payload_file: str, source: str, target: str) -> None:
        """Move a checkpoint (folders as strings), sidecar first (it leaves ``source``
        atomically), then payload."""
        for name in (f"{checkpoint_id}.json", payload_file):
            try:
                os.replace(f"{source}/{name}", f"{target}/{name}")
            except FileNotFoundError:
                continue  # moved or deleted by someone else meanwhile
        with self._lock:
            (self._active if source == self._active_path else self._archive).remove(checkpoint_id)
            self._active.invalidate()
            self._archive.invalidate()

    def delete_checkpoint(self, checkpoint_id: str, archive: bool = True) -> None:
        """Retire a checkpoint: move it to ``archive/`` (default) or, with
        ``archive=False``, delete its files (from ``archive/`` too). Works on damaged
        checkpoints too (it goes by file name)."""
        checkpoint_id = _check_checkpoint_id(checkpoint_id)
        names = [f"{checkpoint_id}.json", *(f"{checkpoint_id}{ext}" for ext in _PAYLOAD_EXTS)]
        folders = [self.active_dir] if archive else [self.active_dir, self.archive_dir]
        found = [folder for folder in folders if any((folder / n).exists() for n in names)]
        if not found:
            where = "active/" if archive else "active/ or archive/"
            raise CheckpointNotFoundError(f"no checkpoint {checkpoint_id!r} in {where} of {self.checkpoint_dir}")
        try:
            if archive:
                payload = next((n for n in names[1:] if (self.active_dir / n).exists()), names[1])
                self._move(checkpoint_id, payload, self._active_path, self._archive_path)
            else:
                for folder in found:
                    _remove_quietly([folder / n for n in names])
            if self.durable:
                for folder in {*found, self.archive_dir} if archive else found:
                    fsync_dir(folder)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot delete checkpoint {checkpoint_id!r}: {exc}", exc.errno) from exc
        with self._lock:
            self._active.remove(checkpoint_id)
            self._archive.remove(checkpoint_id)
            self._active.invalidate()
            self._archive.invalidate()

    # -- listing ---------------------------------------------------------------------------
    def list_checkpoints(
        self,
        layer_id: str | None = None,
        seed_id: int | None = None,
        lifecycle_state: int | str | None = None,
        limit: int | None = 100,
    ) -> list[CheckpointInfo]:
        """Checkpoints in ``active/``, newest first (by parsed time and sequence), filtered
        by layer, seed and lifecycle state; at most ``limit`` (None: all). With a seed id
        only seed checkpoints are listed; without one, whole-layer checkpoints too."""
        if layer_id is not None:
            _check_layer_id(layer_id)
        if seed_id is not None:
            seed_id = _check_seed_id(seed_id)
        state = lifecycle_state_of(lifecycle_state)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")

        def wanted(info: CheckpointInfo) -> bool:
            return (
                (layer_id is None or info.layer_id == layer_id)
                and (seed_id is None or info.seed_id == seed_id)
                and (state is None or info.lifecycle_state == state)
            )

        with self._lock:
            self._active.refresh()
            if layer_id is not None and seed_id is not None:
                found = [info for info in newest_first(self._active.for_key((layer_id, "seed", seed_id))) if wanted(info)]
                return found[:limit]
            return self._active.select(limit, None if layer_id is None and seed_id is None and state is None else wanted)

    def get_latest_checkpoint(self, layer_id: str, seed_id: int) -> CheckpointInfo | None:
        """The newest listed checkpoint of a seed, or None."""
        found = self.list_checkpoints(layer_id, _check_seed_id(seed_id), limit=1)
        return found[0] if found else None

    def get_checkpoint_count(self, layer_id: str | None = None, seed_id: int | None = None) -> int:
        """How many checkpoints are in ``active/`` (optionally of one layer / seed)."""
        return len(self.list_checkpoints(layer_id, seed_id, limit=None))

    def get_checkpoint_by_number(self, layer_id: str, seed_id: int, number: int) -> CheckpointInfo | None:
        """The checkpoint whose ``number`` (the value in CHECKPOINT_ID) is ``number`` for
        this seed, looked up in ``active/`` and then ``archive/``; None if there is none."""
        key = (_check_layer_id(layer_id), "seed", _check_seed_id(seed_id))
        number = operator.index(number)
        with self._lock:
            for index in (self._active, self._archive):
                index.refresh()
                matches = [i for i in index.for_key(key) if i.number == number]
                if matches:
                    return newest_first(matches)[0]
        return None

    # -- reading ---------------------------------------------------------------------------
    def restore_checkpoint(self, checkpoint_id: str, target_device: str | torch.device | None = None) -> dict[str, Any]:
        """Load a checkpoint (from ``active/`` or ``archive/``) after checking it.

        Returns ``{version: 2, checkpoint_id, layer_id, seed_id, number, timestamp,
        priority, lifecycle_state, state_data, blueprint_state, metadata,
        source_version}`` with every tensor on ``target_device`` (CPU by default). v1 files
        come back migrated to this form. Raises :class:`CheckpointNotFoundError`,
        :class:`CheckpointCorruptError` (naming the damaged file) or
        :class:`UnsafeCheckpointError`."""
        checkpoint_id = _check_checkpoint_id(checkpoint_id)
        device = _device(target_device)
        try:
            return self._load(self._locate(checkpoint_id), checkpoint_id, device)
        except CheckpointCorruptError:
            if (self.archive_dir / f"{checkpoint_id}.json").exists():  # archived while we read it
                return self._load(self.archive_dir, checkpoint_id, device)
            raise

    def verify(self, checkpoint_id: str) -> CheckpointInfo:
        """Check a checkpoint completely (sidecar checksum, payload size, sha256, header;
        for v1 a weights-only load) and return its info; raise
        :class:`CheckpointCorruptError` naming the file and the problem otherwise."""
        checkpoint_id = _check_checkpoint_id(checkpoint_id)
        return self._load(self._locate(checkpoint_id), checkpoint_id, None, decode=False)

    def _locate(self, checkpoint_id: str) -> Path:
        for folder in (self.active_dir, self.archive_dir):
            if any((folder / f"{checkpoint_id}{ext}").exists() for ext in (".json", *_PAYLOAD_EXTS)):
                return folder
        raise CheckpointNotFoundError(f"no checkpoint {checkpoint_id!r} in {self.checkpoint_dir}")

    def _load(self, folder: Path, checkpoint_id: str, device: torch.device | None, decode: bool = True) -> Any:
        sidecar = folder / f"{checkpoint_id}.json"
        try:
            raw = sidecar.read_bytes()
        except FileNotFoundError:
            orphan = next(
                (folder / f"{checkpoint_id}{e}" for e in _PAYLOAD_EXTS if (folder / f"{checkpoint_id}{e}").exists()), None
            )
            if orphan is None:
                raise CheckpointNotFoundError(f"no checkpoint {checkpoint_id!r} in {folder}") from None
            raise CheckpointCorruptError(
                f"payload {orphan} has no sidecar {sidecar.name} (an unfinished save or a deleted sidecar)", orphan
            ) from None
        location = "archive" if folder == self.archive_dir else "active"
        body = load_json(raw, sidecar)
        if not is_v2_sidecar(body):
            return self._load_v1(folder, sidecar, body, location, device, decode)
        info = parse_sidecar(body, sidecar, location=location, strict=True)
        buffer = _read_payload(folder / info.payload_file, info, sidecar)
        sections = decode_payload(buffer, folder / info.payload_file, device)
        if not decode:
            return info
        return _result(info, sections, source_version=2)

    def _load_v1(
        self, folder: Path, sidecar: Path, body: dict[str, Any], location: str, device: torch.device | None, decode: bool
    ) -> Any:
        info = parse_v1_sidecar(body, sidecar, location=location)
        payload = folder / info.payload_file
        try:
            size = payload.stat().st_size
            data = load_v1(payload)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"sidecar {sidecar} has no payload: {payload} is missing", sidecar) from None
        if info.payload_size and size != info.payload_size:
            raise CheckpointCorruptError(
                f"payload {payload} is {size} bytes but its sidecar says {info.payload_size} (truncated or damaged)", payload
            )
        if str(data.get("layer_id")) != info.layer_id or _int_or_none(data.get("seed_id")) != info.seed_id:
            raise CheckpointCorruptError(f"payload {payload} belongs to another checkpoint than its sidecar {sidecar}", payload)
        if not decode:
            return info
        sections = {k: _to_device(data.get(k), device) for k in ("state_data", "blueprint_state", "metadata")}
        return _result(info, sections, source_version=1)

    # -- whole layer -----------------------------------------------------------------------
    def restore_layer_state(
        self,
        layer_id: str,
        checkpoint_id: str | None = None,
        state: ExtendedStateTensor | None = None,
        target_device: str | torch.device | None = None,
    ) -> tuple[ExtendedStateTensor, dict[str, torch.Tensor]]:
        """Load a whole-layer checkpoint (the newest of ``layer_id`` unless
        ``checkpoint_id`` is given). With ``state``, its buffers are filled in place (on
        its device) and it is returned; otherwise a new :class:`ExtendedStateTensor` is
        built on ``target_device``. Returns ``(state, blueprints)``."""
        from .state import ExtendedStateTensor

        layer_id = _check_layer_id(layer_id)
        if checkpoint_id is None:
            with self._lock:
                self._active.refresh()
                newest = newest_first(self._active.for_key((layer_id, "layer", None)))
            if not newest:
                raise CheckpointNotFoundError(f"no whole-layer checkpoint of layer {layer_id!r} in {self.active_dir}")
            checkpoint_id = newest[0].checkpoint_id
        loaded = self.restore_checkpoint(checkpoint_id, target_device)
        if loaded.get("kind") != "layer" or loaded["layer_id"] != layer_id:
            raise ValueError(f"checkpoint {checkpoint_id!r} is not a whole-layer checkpoint of layer {layer_id!r}")
        return _fill_state(loaded["state"], state, ExtendedStateTensor, target_device), loaded["blueprints"]

    # -- one seed of a state tensor ----------------------------------------------------------
    def save_seed_state(
        self,
        layer_id: str,
        state: ExtendedStateTensor,
        seed_id: int,
        blueprint_state: Mapping[str, torch.Tensor] | None = None,
        priority: str = "high",
        *,
        lock: AbstractContextManager[Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Checkpoint one seed's row of ``state``: ``state_data`` holds
        ``lifecycle_state`` and the tensors ``row`` (8 int32), ``history`` (H, 2),
        ``history_count`` and ``metrics`` (4 float32). The saved row's CHECKPOINT_ID
        already holds the new checkpoint's ``number``; after the save the live column is
        set to it too, unless the row was copied again or restored meanwhile (then the
        later save or the restore decides) or the column changed otherwise.
        ``lock`` (e.g. the lifecycle manager's) is held while the row is copied and while
        CHECKPOINT_ID is written, not during the I/O."""
        layer_id = _check_layer_id(layer_id)
        seed_id = _check_seed_id(seed_id)
        priority = _check_priority(priority)
        if not 0 <= seed_id < state.num_seeds:
            raise IndexError(f"seed {seed_id} does not exist (there are {state.num_seeds} seeds)")
        key = (layer_id, "seed", seed_id)
        number = self._next_number(key)
        with lock if lock is not None else nullcontext():
            row = state.state[seed_id].clone()
            state_data = {
                "row": row,
                "history": state.history[seed_id].clone(),
                "history_count": state.history_count[seed_id].clone(),
                "metrics": state.metrics[seed_id].clone(),
            }
            token = self._claim_row(state, seed_id)
        previous = int(row[_CHECKPOINT_COLUMN])
        row[_CHECKPOINT_COLUMN] = number
        lifecycle = int(row[_LIFECYCLE_COLUMN])
        payload = encode_payload(
            {
                "state_data": {"lifecycle_state": lifecycle, **state_data},
                "blueprint_state": None if blueprint_state is None else dict(blueprint_state),
                "metadata": dict(metadata or {}),
            }
        )
        info = self._commit(key, priority, lifecycle, payload, number)
        with lock if lock is not None else nullcontext():
            newest = self._row_tokens.get(state, {}).get(seed_id) == token
            if newest and int(state.state[seed_id, _CHECKPOINT_COLUMN]) == previous:
                state.set_checkpoint([seed_id], [number])
        return info

    def _claim_row(self, state: ExtendedStateTensor, seed_id: int) -> int:
        """A new token for ``seed_id``'s row of ``state``: the latest copy or restore."""
        with self._lock:
            token = self._next_token()
            self._row_tokens.setdefault(state, {})[seed_id] = token
            return token

    def restore_seed_state(
        self,
        checkpoint_id: str,
        state: ExtendedStateTensor,
        seed_id: int | None = None,
        *,
        lock: AbstractContextManager[Any] | None = None,
    ) -> dict[str, Any]:
        """Write a checkpoint made by :meth:`save_seed_state` back into ``state`` (row,
        history, history count, metrics of ``seed_id``, by default the checkpoint's own
        seed) and return the restored checkpoint. Nothing changes if it does not fit."""
        loaded = self.restore_checkpoint(checkpoint_id, state.device)
        seed_id = loaded["seed_id"] if seed_id is None else _check_seed_id(seed_id)
        if seed_id is None or not 0 <= seed_id < state.num_seeds:
            raise IndexError(f"seed {seed_id} does not exist (there are {state.num_seeds} seeds)")
        data = loaded["state_data"]
        parts = {buffer: data.get(name) for buffer, name in _SEED_ROW_PARTS.items()}
        for buffer, value in parts.items():
            own = getattr(state, buffer)[seed_id]
            if not isinstance(value, torch.Tensor) or value.shape != own.shape or value.dtype != own.dtype:
                raise ValueError(
                    f"checkpoint {checkpoint_id!r} holds no seed row {_SEED_ROW_PARTS[buffer]!r} "
                    f"shaped like {tuple(own.shape)} {own.dtype}"
                )
        with lock if lock is not None else nullcontext():
            for buffer, value in parts.items():
                getattr(state, buffer)[seed_id] = value
            self._claim_row(state, seed_id)  # saves in flight no longer write CHECKPOINT_ID
        return loaded

    # -- migration -------------------------------------------------------------------------
    def migrate(self, path: str | os.PathLike[str]) -> str:
        """Rewrite a v1 ``.pt`` checkpoint (in this manager's ``active/`` or ``archive/``)
        as v2 files, atomically, keeping ``<id>.pt.bak`` (and ``<id>.json.bak``). The
        checkpoint keeps its id. Returns the id. A file whose pickle would run code is
        refused (:class:`UnsafeCheckpointError`) and nothing is written."""
        path = Path(path)
        folder = path.resolve().parent
        if path.suffix != ".pt" or folder not in (self.active_dir.resolve(), self.archive_dir.resolve()):
            raise ValueError(f"{path} is not a v1 .pt file in {self.active_dir} or {self.archive_dir}")
        checkpoint_id = _check_checkpoint_id(path.stem)
        sidecar = folder / f"{checkpoint_id}.json"
        location = "archive" if folder == self.archive_dir.resolve() else "active"
        try:
            with self._lock:
                body = load_json(sidecar.read_bytes(), sidecar) if sidecar.exists() else None
                if body is not None and is_v2_sidecar(body):  # migrated before; finish the clean-up
                    if path.exists():
                        self._backup(path, path.with_name(path.name + ".bak"))
                        os.unlink(path)
                    return checkpoint_id
                if not path.exists():
                    raise CheckpointNotFoundError(f"no v1 checkpoint {path}")
                data = load_v1(path)
                fields = body if body is not None else data
                try:
                    info = info_from_v1(fields, checkpoint_id, location, file_size=path.stat().st_size)
                    _check_layer_id(info.layer_id)
                    payload = encode_payload(
                        {
                            k: data.get(k) if k != "metadata" else dict(data.get(k) or {})
                            for k in ("state_data", "blueprint_state", "metadata")
                        }
                    )
                except (ValueError, TypeError, KeyError) as exc:
                    raise CheckpointError(f"cannot migrate {path}: {exc}") from None
                info = info._replace(
                    version=2, payload_file=f"{checkpoint_id}.safetensors", payload_size=payload.size, sha256=payload.sha256
                )
                self._backup(path, path.with_name(path.name + ".bak"))
                if body is not None:
                    self._backup(sidecar, sidecar.with_name(sidecar.name + ".bak"))
                atomic_write(folder / info.payload_file, payload.chunks, durable=self.durable)
                atomic_write(sidecar, build_sidecar(info), durable=self.durable)  # the commit point
                os.unlink(path)
                if self.durable:
                    fsync_dir(folder)
                self._active.invalidate()
                self._archive.invalidate()
        except OSError as exc:
            raise CheckpointWriteError(f"cannot migrate {path}: {exc}", exc.errno) from exc
        return checkpoint_id

    def _backup(self, source: Path, backup: Path) -> None:
        if not backup.exists():
            atomic_write(backup, source.read_bytes(), durable=self.durable)

    # -- housekeeping ----------------------------------------------------------------------
    def _make_folders(self) -> None:
        created = False
        for folder in (self.checkpoint_dir, self.active_dir, self.archive_dir):
            if not folder.is_dir():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except FileExistsError:
                    raise NotADirectoryError(f"checkpoint folder {folder} exists and is not a folder") from None
                created = True
        if created and self.durable:
            fsync_dir(self.checkpoint_dir)
            fsync_dir(self.checkpoint_dir.parent)

    def _finish_interrupted_moves(self, active_scan: FolderScan, archive_scan: FolderScan) -> None:
        """Complete moves to ``archive/`` cut short by a crash (sidecar and payload in
        different folders). Only names of checkpoints are touched. A checkpoint with files
        in both folders is found by walking the names of the smaller one."""
        if active_scan.empty or archive_scan.empty:
            return
        active, archived = active_scan.names, archive_scan.names
        active_set, archived_set = set(active), set(archived)
        for name in archived if len(archived) <= len(active) else active:
            stem, dot, ext = name.rpartition(".")
            if not dot or (ext != "json" and f".{ext}" not in _PAYLOAD_EXTS):
                continue
            if ext == "json":
                pairs = [(f"{stem}.json", f"{stem}{payload}") for payload in _PAYLOAD_EXTS]
            else:
                pairs = [(f"{stem}.json", name)]
            for sidecar, payload in pairs:
                if sidecar in archived_set and payload in active_set and payload not in archived_set:
                    os.replace(self.active_dir / payload, self.archive_dir / payload)
                elif sidecar in active_set and payload in archived_set and payload not in active_set:
                    os.replace(self.active_dir / sidecar, self.archive_dir / sidecar)

    def candidates(self, key: SeedKey) -> list[tuple[str, Path]]:
        """Every checkpoint id of ``key`` that has any file in ``active/`` or ``archive/``
        (damaged ones included), newest first: what recovery walks through."""
        found: dict[str, tuple[tuple[int, int], int, Path]] = {}
        for rank, folder in enumerate((self.active_dir, self.archive_dir)):
            for entry in os.scandir(folder):
                stem, ext = os.path.splitext(entry.name)
                if ext not in (".json", *_PAYLOAD_EXTS) or is_temp_name(entry.name) or stem in found:
                    continue
                order = next((order for read, order in _id_readings(stem) if read == key), None)
                if order is not None:
                    found[stem] = (order, -rank, folder)
        ordered = sorted(found.items(), key=lambda item: (item[1][0], item[1][1], item[0]), reverse=True)
        return [(checkpoint_id, folder) for checkpoint_id, (_, _, folder) in ordered]

    def load_from(self, folder: Path, checkpoint_id: str, target_device: str | torch.device | None = None) -> dict[str, Any]:
        """Restore ``checkpoint_id`` from exactly ``folder`` (``active_dir`` or ``archive_dir``)."""
        return self._load(folder, _check_checkpoint_id(checkpoint_id), _device(target_device))


# ---- helpers -----------------------------------------------------------------------------
def _read_payload(path: Path, info: CheckpointInfo, sidecar: Path) -> torch.Tensor:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointCorruptError(f"sidecar {sidecar} has no payload: {path} is missing", sidecar) from None
    try:
        size = os.fstat(fd).st_size
        if size != info.payload_size:
            raise CheckpointCorruptError(
                f"payload {path} is {size} bytes but its sidecar says {info.payload_size} (truncated or damaged)", path
            )
        buffer = torch.empty(size, dtype=torch.uint8)
        digest = _read_hashed(fd, memoryview(buffer.numpy()))
    finally:
        os.close(fd)
    if digest is None:
        raise CheckpointCorruptError(f"payload {path} ended early (truncated while reading)", path)
    if digest != info.sha256:
        raise CheckpointCorruptError(f"payload {path} fails its sha256 check (bit flip or overwritten data)", path)
    return buffer


# Payloads of BACKGROUND_HASH_BYTES or more are hashed on a second thread, piece by
# piece, while the rest is read: a whole-layer restore costs about the longer of the two.
_READ_PIECE_BYTES = 4 << 20


def _read_hashed(fd: int, view: memoryview) -> str | None:
    """Fill ``view`` from ``fd`` and return the sha256 of what was read (hex), or None
    when the file ends before ``view`` is full."""
    size = view.nbytes
    if size < BACKGROUND_HASH_BYTES:
        done = 0
        while done < size:
            count = os.readv(fd, [view[done:]])
            if count == 0:
                return None
            done += count
        return sha256_hex((view,))
    digest = hashlib.sha256()
    pieces: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()

    def hash_pieces() -> None:
        while (piece := pieces.get()) is not None:
            digest.update(view[piece[0] : piece[1]])

    hasher = threading.Thread(target=hash_pieces, name="kasmina-sha256", daemon=True)
    hasher.start()
    done = 0
    try:
        while done < size:
            count = os.readv(fd, [view[done : done + _READ_PIECE_BYTES]])
            if count == 0:
                return None
            pieces.put((done, done + count))
            done += count
    finally:
        pieces.put(None)
        hasher.join()
    return digest.hexdigest()


def _result(info: CheckpointInfo, sections: Mapping[str, Any], *, source_version: int) -> dict[str, Any]:
    result = {
        "version": 2,
        "checkpoint_id": info.checkpoint_id,
        "kind": info.kind,
        "layer_id": info.layer_id,
        "seed_id": info.seed_id,
        "number": info.number,
        "timestamp": info.timestamp,
        "priority": info.priority,
        "lifecycle_state": info.lifecycle_state,
        "source_version": source_version,
    }
    result.update(sections)
    return result


def _to_device(value: Any, device: torch.device | None) -> Any:
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _fill_state(state_dict: Mapping[str, torch.Tensor], state: Any, cls: type, target_device: Any) -> Any:
    if state is not None:
        state.load_state_dict(dict(state_dict))  # copies into its buffers, on its device
        return state
    # a new one takes the loaded tensors as its buffers (no allocation, no copy)
    fresh = cls(int(state_dict["state"].shape[0]), device="meta")
    fresh.load_state_dict(dict(state_dict), assign=True)
    return fresh


def _archive_move(folder: bytes, archive: bytes, info: CheckpointInfo) -> tuple[bytes, bytes, bytes, bytes]:
    """Retention's move of ``info`` for the native commit: (sidecar, its target, payload, its target)."""
    sidecar, payload = f"/{info.checkpoint_id}.json".encode(), f"/{info.payload_file}".encode()
    return folder + sidecar, archive + sidecar, folder + payload, archive + payload


def _warn_unarchived(info: CheckpointInfo, exc: OSError) -> None:
    """Retention could not move ``info`` (the save itself succeeded; the next one retries)."""
    warnings.warn(f"retention could not archive {info.checkpoint_id}: {exc}", RuntimeWarning, stacklevel=2)


def _remove_quietly(paths: Iterable[str | Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # keep going: the caller is already reporting a failure
            warnings.warn(f"could not remove {path}: {exc}", RuntimeWarning, stacklevel=3)


# ---- recovery ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SkippedCheckpoint:
    """A newer checkpoint that recovery could not use, and why."""

    checkpoint_id: str
    location: str
    reason: str


@dataclass(frozen=True)
class RecoveryResult:
    """The newest checkpoint that verified (``checkpoint`` is what
    :meth:`CheckpointManager.restore_checkpoint` returns) and the newer ones skipped."""

    checkpoint_id: str
    location: str
    checkpoint: dict[str, Any]
    skipped: tuple[SkippedCheckpoint, ...]


class CheckpointRecovery:
    """Finds the newest usable checkpoint of a seed (or layer), skipping damaged ones."""

    def __init__(self, manager: CheckpointManager) -> None:
        if not isinstance(manager, CheckpointManager):
            raise TypeError(f"CheckpointRecovery needs a CheckpointManager, got {type(manager).__name__}")
        self.manager = manager

    def recover_seed_state(self, layer_id: str, seed_id: int, target_device: str | torch.device | None = None) -> RecoveryResult:
        """Walk the seed's checkpoints newest first (``active/``, then ``archive/``;
        damaged and unfinished ones included) and return the first that verifies. Raises
        :class:`CheckpointNotFoundError` (with ``.skipped``) when none does."""
        return self._recover((_check_layer_id(layer_id), "seed", _check_seed_id(seed_id)), target_device)

    def recover_layer_state(self, layer_id: str, target_device: str | torch.device | None = None) -> RecoveryResult:
        """As :meth:`recover_seed_state`, for whole-layer checkpoints; feed the result's
        ``checkpoint_id`` to :meth:`CheckpointManager.restore_layer_state`."""
        return self._recover((_check_layer_id(layer_id), "layer", None), target_device)

    def _load_candidate(self, folder: Path, checkpoint_id: str, device: torch.device | None) -> tuple[str, dict[str, Any]]:
        """(location, checkpoint) of a listed candidate; one listed in ``active/`` that
        retention has archived since is read from ``archive/``."""
        manager = self.manager
        if folder == manager.archive_dir:
            return "archive", manager.load_from(folder, checkpoint_id, device)
        try:
            return "active", manager.load_from(folder, checkpoint_id, device)
        except CheckpointNotFoundError:
            return "archive", manager.load_from(manager.archive_dir, checkpoint_id, device)

    def _recover(self, key: SeedKey, target_device: Any) -> RecoveryResult:
        device = _device(target_device)
        skipped: list[SkippedCheckpoint] = []
        manager = self.manager
        for checkpoint_id, folder in manager.candidates(key):
            location = "archive" if folder == manager.archive_dir else "active"
            try:
                location, checkpoint = self._load_candidate(folder, checkpoint_id, device)
            except (CheckpointCorruptError, UnsafeCheckpointError, CheckpointNotFoundError) as exc:
                skipped.append(SkippedCheckpoint(checkpoint_id, location, str(exc)))
                continue
            held = (checkpoint["layer_id"], checkpoint["kind"], checkpoint["seed_id"])
            if held != key:  # a name that fits this key's form but holds another's checkpoint
                skipped.append(SkippedCheckpoint(checkpoint_id, location, f"it holds the checkpoint of {_describe(held)}"))
                continue
            return RecoveryResult(checkpoint_id, location, checkpoint, tuple(skipped))
        error = CheckpointNotFoundError(
            f"no usable checkpoint of {_describe(key)} in {manager.checkpoint_dir}"
            + (f"; skipped {len(skipped)}: " + "; ".join(f"{s.checkpoint_id}: {s.reason}" for s in skipped) if skipped else "")
        )
        error.skipped = tuple(skipped)  # type: ignore[attr-defined]
        raise error


# ---- LifecycleManager integration -----------------------------------------------------------
@dataclass(frozen=True)
class TransitionCheckpoint:
    """What checkpointing a seed after its transition gave: the checkpoint id and number,
    or the error (then ERROR_COUNT was incremented and the transition still stands)."""

    checkpoint_id: str | None
    number: int | None
    error: str | None


def checkpoint_after_transition(
    manager: CheckpointManager,
    layer_id: str,
    state: ExtendedStateTensor,
    seed_id: int,
    lock: AbstractContextManager[Any] | None = None,
    blueprint_state: Callable[[int], Mapping[str, torch.Tensor] | None] | None = None,
) -> TransitionCheckpoint:
    """Save a ``high`` checkpoint of a seed that just changed state (with the blueprint
    state ``blueprint_state(seed_id)`` returns, when given) and put its number into
    CHECKPOINT_ID. Never raises for a failed save: it increments the seed's ERROR_COUNT
    and returns the error, because the transition itself is already committed."""
    try:
        blueprint = blueprint_state(seed_id) if blueprint_state is not None else None
        info = manager.save_seed_state(layer_id, state, seed_id, blueprint, "high", lock=lock)
    except Exception as exc:  # the transition stands; the failure is reported and counted
        with lock if lock is not None else nullcontext():
            state.increment_error_count([seed_id])
        message = f"checkpoint of seed {seed_id} failed: {type(exc).__name__}: {exc}"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return TransitionCheckpoint(None, None, message)
    return TransitionCheckpoint(info.checkpoint_id, info.number, None)


def validate_layer_id(layer_id: Any) -> str:
    """Return ``layer_id`` if it may name checkpoints, else raise ``ValueError``."""
    return _check_layer_id(layer_id)
