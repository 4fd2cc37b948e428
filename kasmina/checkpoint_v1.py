"""Reading and migrating v1 checkpoints (the original ``.pt`` layout).

A v1 checkpoint is ``<layer>_<seed>_<ms>.pt``, written by ``torch.save`` of a dict
``{version, checkpoint_id, layer_id, seed_id, timestamp, priority, state_data,
blueprint_state, metadata}``, next to a ``.json`` sidecar ``{checkpoint_id, layer_id,
seed_id, timestamp, priority, lifecycle_state, file_size}``. Files are only ever opened
with ``torch.load(weights_only=True)``: a pickle that would import or call anything
outside PyTorch's allow-list is refused (:class:`UnsafeCheckpointError`) and nothing in
it runs. Migration goes through an ordered, version-keyed list of functions.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint_errors import CheckpointCorruptError, UnsafeCheckpointError
from .checkpoint_format import FORMAT_VERSION, PRIORITIES, CheckpointInfo, lifecycle_state_of

__all__ = ["MIGRATIONS", "V1_ID_RE", "load_v1", "parse_v1_sidecar", "upgrade"]

V1_ID_RE = re.compile(r"^(?P<layer>.+)_(?P<seed>\d+)_(?P<ms>\d+)\Z")
_REQUIRED = ("layer_id", "seed_id", "state_data")


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v1 -> v2: version 2, priority 'normal' when absent, state_data['state'] renamed
    to state_data['lifecycle_state']."""
    out = dict(data)
    out["version"] = 2
    if out.get("priority") is None:
        out["priority"] = "normal"
    state_data = dict(out.get("state_data") or {})
    if "state" in state_data:
        state_data["lifecycle_state"] = state_data.pop("state")
    out["state_data"] = state_data
    return out


# (version a function upgrades from, the function); applied in order.
MIGRATIONS: tuple[tuple[int, Callable[[dict[str, Any]], dict[str, Any]]], ...] = ((1, _v1_to_v2),)


def upgrade(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Run every migration from ``data``'s version (1 when it has none) up to v2."""
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointCorruptError(f"v1 checkpoint {path}: unknown version {version!r}", path)
    for from_version, migrate in MIGRATIONS:
        if version == from_version:
            data = migrate(data)
            version = data["version"]
    return data


def load_v1(path: Path) -> dict[str, Any]:
    """Load a v1 ``.pt`` with ``weights_only=True`` and return it upgraded to v2 form."""
    flag = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "").strip().lower()
    if flag not in ("", "0", "false", "no", "off"):
        raise UnsafeCheckpointError(
            f"refusing v1 checkpoint {path}: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, which would make torch.load "
            "unpickle arbitrary code; unset it to load v1 checkpoints"
        )
    _check_crcs(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing v1 checkpoint {path}: torch.load(weights_only=True) rejected its pickle ({_reason(exc)}); "
            "it would import or run code outside the weights-only allow-list, or it is damaged. Nothing in it was executed."
        ) from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointCorruptError(f"v1 checkpoint {path} is corrupt or truncated: {str(exc).splitlines()[0]}", path) from None
    if not isinstance(data, dict) or any(key not in data for key in _REQUIRED) or not isinstance(data["state_data"], dict):
        raise CheckpointCorruptError(f"v1 checkpoint {path} is not a Kasmina v1 checkpoint (needs keys {_REQUIRED})", path)
    return upgrade(data, path)


def _check_crcs(path: Path) -> None:
    """Check the CRC-32 of every entry of a zip-format ``.pt`` (torch.load does not);
    :class:`CheckpointCorruptError` naming the first damaged entry. Files of torch's older
    non-zip format carry no checksums and pass."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        return
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise CheckpointCorruptError(f"v1 checkpoint {path} is corrupt or truncated: {exc}", path) from None
    if damaged is not None:
        raise CheckpointCorruptError(f"v1 checkpoint {path} is corrupt: its entry {damaged!r} fails its CRC-32 check", path)


def parse_v1_sidecar(body: dict[str, Any], path: Path, *, location: str) -> CheckpointInfo:
    """Describe a v1 checkpoint from its ``.json`` sidecar's JSON object."""
    try:
        checkpoint_id = body["checkpoint_id"]
        if not isinstance(checkpoint_id, str) or path.name != f"{checkpoint_id}.json":
            raise ValueError(f"checkpoint_id {checkpoint_id!r} does not match the file name")
        return info_from_v1(body, checkpoint_id, location, file_size=int(body.get("file_size", 0)))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorruptError(f"v1 sidecar {path} is garbled: {exc!r}", path) from None


def info_from_v1(fields: dict[str, Any], checkpoint_id: str, location: str, *, file_size: int) -> CheckpointInfo:
    """A :class:`CheckpointInfo` for a v1 checkpoint from its sidecar or payload fields."""
    match = V1_ID_RE.match(checkpoint_id)
    timestamp = float(fields.get("timestamp") or 0.0)
    created_ms = int(match["ms"]) if match else int(timestamp * 1000)
    priority = fields.get("priority") or "normal"
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r} unknown")
    state = fields.get("lifecycle_state", (fields.get("state_data") or {}).get("lifecycle_state"))
    return CheckpointInfo(
        checkpoint_id=checkpoint_id,
        kind="seed",
        layer_id=str(fields["layer_id"]),
        seed_id=int(fields["seed_id"]),
        number=0,
        created_ms=created_ms,
        seq=0,
        timestamp=timestamp or created_ms / 1000,
        priority=priority,
        lifecycle_state=lifecycle_state_of(state),
        payload_file=f"{checkpoint_id}.pt",
        payload_size=file_size,
        sha256=None,
        version=1,
        location=location,
    )


_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation of torch.load")


def _reason(exc: BaseException) -> str:
    """What torch.load(weights_only=True) objected to, without its advice to retry
    with weights_only=False."""
    text = str(exc)
    if match := re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S):
        return " ".join(match.group(1).split())[:300]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    useful = [p for p in paragraphs if not p.startswith(_TORCH_BOILERPLATE)]
    return (useful or paragraphs or [type(exc).__name__])[0][:300]
