"""The checkpoint index snapshot: a pure cache, trusted without listing the folder only
while the folder provably is what the snapshot describes, and rebuilt from the sidecars
whenever anything about it is wrong."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from kasmina import checkpoint_index as ckpt_index
from kasmina import checkpoint_scan as ckpt_scan
from kasmina import checkpoint_snapshot as ckpt_snapshot
from kasmina._extension import HAS_EXTENSION
from kasmina.checkpoint import CheckpointInfo, CheckpointManager
from kasmina.durable_io import TEMP_PREFIX


def _state(value: int) -> dict:
    return {"lifecycle_state": 2, "metrics": torch.tensor([0.5, float(value), math.nan, 1.0]), "epoch": value}


@pytest.fixture(autouse=True)
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_scan, "SETTLE_NS", 0)  # every scan counts as settled (no timing in tests)
    monkeypatch.setattr(ckpt_index, "_CACHE_AFTER_PARSING", 2)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the sidecars the index parses."""
    names: list[str] = []
    real = ckpt_index.SidecarIndex._read
    monkeypatch.setattr(ckpt_index.SidecarIndex, "_read", lambda self, path: names.append(path.name) or real(self, path))
    return names


@pytest.fixture
def listed_folders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Folders listed with os.scandir or the index's (native) scan, on this thread or another."""
    folders: list[str] = []
    real_scandir, real_scan = os.scandir, ckpt_index.scan_folder

    class RecordedBackgroundScan(ckpt_scan.BackgroundScan):
        def __init__(self, folder: Path) -> None:
            folders.append(os.fspath(folder))
            super().__init__(folder)

    monkeypatch.setattr(os, "scandir", lambda path: folders.append(os.fspath(path)) or real_scandir(path))
    monkeypatch.setattr(ckpt_index, "scan_folder", lambda path: folders.append(os.fspath(path)) or real_scan(path))
    monkeypatch.setattr(ckpt_index, "BackgroundScan", RecordedBackgroundScan)
    return folders


def _vouched_folder(root: Path) -> list[int] | None:
    """The folder identity the snapshot is vouched for, if any."""
    path = root / ".index-cache-active.json"
    snapshot = ckpt_snapshot.Snapshot.read(path, "active", ckpt_snapshot.read_vouch(path))
    return None if snapshot is None else snapshot.folder


def _truth(root: Path) -> list[CheckpointInfo]:
    """Every checkpoint in active/, newest first, parsed from the sidecars (no snapshot)."""
    index = ckpt_index.SidecarIndex(root / "active", "active")
    index.refresh()
    return index.select(None)


def _certified(root: Path, count: int = 6) -> list[str]:
    """Write ``count`` checkpoints (3 seeds), then let a manager leave a snapshot that
    vouches for the folder. Returns the ids, oldest first."""
    writer = CheckpointManager(root, durable=False)
    ids = [writer.save_checkpoint("L", i % 3, _state(i), priority="high") for i in range(count)]
    CheckpointManager(root).list_checkpoints()  # parses every sidecar and leaves the snapshot
    assert _vouched_folder(root) is not None
    # Folder times are coarse (a clock tick of up to 10 ms): a change in the same tick as the
    # snapshot's scan could keep them. Production code only trusts scans made 100 ms after
    # the last change (SETTLE_NS, zero in these tests), so wait out the tick here.
    time.sleep(0.02)
    return ids


def test_a_cold_start_on_an_unchanged_folder_lists_nothing_and_decodes_only_what_it_returns(
    tmp_path: Path, reads: list[str], listed_folders: list[str]
) -> None:
    ids = _certified(tmp_path)
    truth = _truth(tmp_path)
    reads.clear()
    listed_folders.clear()
    cold = CheckpointManager(tmp_path)
    assert [i.checkpoint_id for i in cold.list_checkpoints(limit=2)] == ids[:-3:-1]
    assert reads == [] and str(cold.active_dir) not in listed_folders
    assert len(cold._active._snapshot.decoded) == 2  # the other rows stay undecoded
    assert cold.list_checkpoints(limit=None) == truth
    assert [i.checkpoint_id for i in cold.list_checkpoints("L", 1)] == [ids[4], ids[1]]
    assert cold.get_checkpoint_by_number("L", 2, 2).checkpoint_id == ids[5]
    assert reads == []


@pytest.mark.parametrize("change", ["save", "delete", "replace sidecar", "replace sidecar, then reset mtime", "rename away"])
def test_any_change_to_the_folder_is_seen_by_the_next_cold_start(tmp_path: Path, reads: list[str], change: str) -> None:
    ids = _certified(tmp_path)
    other = CheckpointManager(tmp_path, durable=False)
    active = tmp_path / "active"
    before = os.stat(active)
    expected_reads: list[str] = []
    if change == "save":
        new = other.save_checkpoint("L", 0, _state(9), priority="high")
        expected_reads = [f"{new}.json"]
    elif change == "delete":
        other.delete_checkpoint(ids[2], archive=False)
    elif change.startswith("replace sidecar"):
        sidecar = active / f"{ids[2]}.json"
        body = json.loads(sidecar.read_bytes())
        body["priority"] = "critical"
        (active / "edited.tmp").write_text(json.dumps(body))
        os.replace(active / "edited.tmp", sidecar)  # a new inode under the old name
        expected_reads = [sidecar.name]
        if change.endswith("reset mtime"):  # the folder's mtime put back: its ctime still moved
            os.utime(active, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif change == "rename away":  # the checkpoint leaves active/ (as retention does)
        other.delete_checkpoint(ids[3])
    truth = _truth(tmp_path)
    reads.clear()
    cold = CheckpointManager(tmp_path)
    listed = cold.list_checkpoints(limit=None)
    assert listed == truth
    assert reads == expected_reads
    if change == "save":
        assert listed[0].checkpoint_id == expected_reads[0][:-5]
    elif change.startswith("replace"):
        assert {i.checkpoint_id: i.priority for i in listed}[ids[2]] == "critical"
    else:
        assert len(listed) == len(ids) - 1


def test_an_untidy_folder_is_always_listed_and_cleaned(tmp_path: Path, listed_folders: list[str]) -> None:
    _certified(tmp_path)
    active = tmp_path / "active"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = active / f"{TEMP_PREFIX}{int(dead.stdout)}-0-payload.tmp"
    stale.write_bytes(b"partial")
    (active / "L_seed0_1_1.safetensors").write_bytes(b"an unfinished save")  # payload without sidecar
    CheckpointManager(tmp_path).list_checkpoints()  # the temp file goes; the orphan payload stays
    assert not stale.exists()
    assert _vouched_folder(tmp_path) != list(ckpt_scan.folder_identity(active))  # an orphan payload: no promise about the folder
    listed_folders.clear()
    stale.write_bytes(b"partial")
    cold = CheckpointManager(tmp_path)
    assert str(active) in listed_folders and cold.cleaned_temp_files == [stale]
    assert cold.list_checkpoints(limit=None) == _truth(tmp_path)


def _rewrite_snapshot(root: Path, edit) -> None:
    """Apply ``edit`` to the snapshot's body lines and fix its crc32, as a bug or a
    hand-edit could: a snapshot that checks out but is wrong."""
    path = root / ".index-cache-active.json"
    header_line, body = path.read_bytes().split(b"\n", 1)
    header = json.loads(header_line)
    lines = body.decode().split("\n")
    edit(lines)
    body = "\n".join(lines).encode()
    header["crc32"] = zlib.crc32(body)
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


def _swap_rows(lines: list[str]) -> None:
    lines[3], lines[4] = lines[4], lines[3]  # each row now sits under another sidecar's name


def _wrong_keys(lines: list[str]) -> None:
    keys = json.loads(lines[2])
    lines[2] = json.dumps([keys[1], keys[0], *keys[2:]])


def _bad_row(lines: list[str]) -> None:
    lines[5] = "[1, 2"


@pytest.mark.parametrize("edit", [_swap_rows, _wrong_keys, _bad_row], ids=["swapped rows", "wrong seed keys", "bad row"])
def test_a_wrong_snapshot_is_dropped_and_the_index_rebuilt_from_sidecars(tmp_path: Path, reads: list[str], edit) -> None:
    ids = _certified(tmp_path)
    _rewrite_snapshot(tmp_path, edit)
    truth = _truth(tmp_path)
    reads.clear()
    cold = CheckpointManager(tmp_path)
    for seed in range(3):  # per-seed lookups (what retention acts on) never return another seed's checkpoint
        assert {i.seed_id for i in cold.list_checkpoints("L", seed)} == {seed}
    assert cold.list_checkpoints(limit=None) == truth
    assert len(cold.list_checkpoints(limit=None)) == len(ids)
    assert sorted(reads) == sorted(f"{i}.json" for i in ids)  # rebuilt from the sidecars


def test_garbage_or_foreign_snapshots_are_ignored(tmp_path: Path) -> None:
    _certified(tmp_path)
    path = tmp_path / ".index-cache-active.json"
    for content in (b"", b"{garbage", b'{"format": "kasmina-checkpoint-index-cache/1", "entries": []}\n', path.read_bytes()[:-9]):
        path.write_bytes(content)
        assert CheckpointManager(tmp_path).list_checkpoints(limit=None) == _truth(tmp_path)


def test_an_index_started_from_a_snapshot_follows_saves_retention_and_deletes(tmp_path: Path) -> None:
    writer = CheckpointManager(tmp_path, durable=False)
    for i in range(12):
        writer.save_checkpoint("L", i % 2, _state(i), priority="normal")
    CheckpointManager(tmp_path).list_checkpoints()  # leaves the snapshot
    assert _vouched_folder(tmp_path) is not None
    manager = CheckpointManager(tmp_path, max_checkpoints_per_seed=3)  # retention now archives the older rows
    new = [manager.save_checkpoint("L", i % 3, _state(100 + i)) for i in range(4)]
    listed = manager.list_checkpoints(limit=None)
    assert listed == _truth(tmp_path)
    assert [i.checkpoint_id for i in listed[:4]] == new[::-1]
    assert [len(manager.list_checkpoints("L", seed)) for seed in range(3)] == [3, 3, 1]
    manager.delete_checkpoint(listed[5].checkpoint_id, archive=False)
    assert manager.list_checkpoints(limit=None) == _truth(tmp_path)
    assert manager.list_checkpoints(limit=None, lifecycle_state=2)[:3] == _truth(tmp_path)[:3]


def test_a_snapshot_is_recertified_after_a_change_that_left_the_sidecars_alone(
    tmp_path: Path, reads: list[str], listed_folders: list[str]
) -> None:
    _certified(tmp_path)
    active = tmp_path / "active"
    body = (tmp_path / ".index-cache-active.json").read_bytes().split(b"\n", 1)[1]
    (active / "notes.txt").write_text("x")  # the folder changes, its checkpoints do not
    (active / "notes.txt").unlink()
    reads.clear()
    CheckpointManager(tmp_path).list_checkpoints()  # lists the folder, matches every row, re-certifies
    assert reads == []
    assert _vouched_folder(tmp_path) == list(ckpt_scan.folder_identity(active))
    assert (tmp_path / ".index-cache-active.json").read_bytes().split(b"\n", 1)[1] == body
    truth = _truth(tmp_path)
    listed_folders.clear()
    assert CheckpointManager(tmp_path).list_checkpoints(limit=None) == truth
    assert str(active) not in listed_folders


@pytest.mark.parametrize(
    ("names", "tidy"),
    [
        (["a.json", "a.safetensors", "b.json", "b.pt"], True),
        (["a.json", "a.safetensors", ".hidden.json", "notes.txt", "a.json.bak", "x.y.json", "x.y.safetensors"], True),
        ([], True),
        (["a.json", "a.safetensors", "b.json"], False),  # a sidecar without payload
        (["a.json", "a.safetensors", "c.safetensors"], False),  # a payload without sidecar
        (["a.json", "a.safetensors", "a.pt"], False),  # two payloads for one sidecar
        (["a.json", "a.safetensors", f"{TEMP_PREFIX}1-2-payload.tmp"], False),  # a temp file
        (["foreign.json"], False),
    ],
)
def test_only_a_tidy_folder_can_be_vouched_for(tmp_path: Path, names: list[str], tidy: bool) -> None:
    for name in names:
        (tmp_path / name).write_bytes(b"")
    scans = [ckpt_scan.scan_folder_python(tmp_path)]
    if HAS_EXTENSION:
        scans.append(ckpt_scan.scan_folder(tmp_path))
    sidecars = {name: (tmp_path / name).stat().st_ino for name in names if name.endswith(".json") and name[0] != "."}
    for scan in scans:
        assert scan.tidy is tidy
        assert sorted(scan.names) == sorted(names)
        assert scan.sidecars == sidecars


@pytest.mark.skipif(not HAS_EXTENSION, reason="the native scan needs the compiled extension")
def test_the_native_scan_agrees_with_the_python_one(tmp_path: Path) -> None:
    """Same names in the same order, same sidecar inodes, same verdict; odd names too."""
    odd = ["ünïcode.json", "ünïcode.safetensors", "with space.json", "with space.pt", ".json", "x.json.tmp", "-.json"]
    for name in odd:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / os.fsdecode(b"not-utf8-\xff.json")).write_bytes(b"")  # listed as surrogate escapes by both
    (tmp_path / "sub.json").mkdir()  # a folder named like a sidecar counts as one, in both
    for count in (0, 3, 500):
        for i in range(count):
            for ext in ("json", "safetensors"):
                (tmp_path / f"L_seed{i}_1_{i}.{ext}").touch()
        native, python = ckpt_scan.scan_folder(tmp_path), ckpt_scan.scan_folder_python(tmp_path)
        assert (native.joined, native.sidecars, native.tidy) == (python.joined, python.sidecars, python.tidy)
        assert native.names == python.names == [entry.name for entry in os.scandir(tmp_path)]
    with pytest.raises(FileNotFoundError, match="missing"):
        ckpt_scan.scan_folder(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        ckpt_scan.scan_folder(tmp_path / "ünïcode.json")
    # the same listing on another thread, as a cold start runs it while it reads the snapshot
    background = ckpt_scan.BackgroundScan(tmp_path).result()
    assert (background.joined, background.sidecars, background.tidy) == (native.joined, native.sidecars, native.tidy)
    with pytest.raises(NotADirectoryError):
        ckpt_scan.BackgroundScan(tmp_path / "ünïcode.json").result()


def test_a_manager_works_in_a_folder_whose_path_is_not_utf8(tmp_path: Path) -> None:
    """The native listing takes only UTF-8 paths; such a folder is listed in Python."""
    folder = tmp_path / os.fsdecode(b"run-\xff")
    assert not ckpt_scan.scans_natively(folder)
    writer = CheckpointManager(folder, durable=False)
    saved = writer.save_checkpoint("L", 0, {"x": torch.ones(2)})
    reopened = CheckpointManager(folder)  # a cold start lists the folder
    assert [i.checkpoint_id for i in reopened.list_checkpoints()] == [saved]
    assert torch.equal(reopened.restore_checkpoint(saved)["state_data"]["x"], torch.ones(2))


@pytest.mark.parametrize(
    ("mtime", "ctime", "age_ns", "settled"),
    [
        (1_700_000_000_123_456_789, 1_700_000_000_123_456_789, 150_000_000, True),  # fine times, 150 ms ago
        (1_700_000_000_123_456_789, 1_700_000_000_123_456_789, 50_000_000, False),
        (1_700_000_000_000_000_000, 1_700_000_000_000_000_000, 150_000_000, False),  # whole seconds: coarse times
        (1_700_000_000_000_000_000, 1_700_000_000_000_000_000, 3_500_000_000, True),
        (1_700_000_000_000_000_000, 1_700_000_000_000_000_001, 150_000_000, True),  # one fine time is enough
    ],
)
def test_a_scan_is_settled_only_when_no_later_change_can_keep_the_folder_times(
    monkeypatch: pytest.MonkeyPatch, mtime: int, ctime: int, age_ns: int, settled: bool
) -> None:
    monkeypatch.setattr(ckpt_scan, "SETTLE_NS", 100_000_000)  # the real value (the fixture zeroes it)
    scan = ckpt_scan.FolderScan((1, 2, mtime, ctime), max(mtime, ctime) + age_ns, "/", {}, True)
    assert scan.settled is settled
