"""CheckpointManager: format, listing, retention, deletion, validation, corruption,
disk-full handling, the metadata index, and CheckpointRecovery."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import kasmina
from kasmina import checkpoint as ckpt
from kasmina import checkpoint_format, durable_io
from kasmina import checkpoint_index as ckpt_index
from kasmina import checkpoint_scan as ckpt_scan
from kasmina._generated.lifecycle_tables import STATE_NAMES
from kasmina.checkpoint import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointRecovery,
    CheckpointWriteError,
)
from kasmina.durable_io import TEMP_PREFIX

ID_RE = re.compile(r"^(?P<layer>.+)_seed(?P<seed>\d+)_(?P<ms>\d+)_(?P<seq>\d+)$")


def _state(value: int, lifecycle: int = 2) -> dict:
    return {
        "lifecycle_state": lifecycle,
        "row": torch.tensor([lifecycle, 1, value, 0, 1, -1, 0, 0], dtype=torch.int32),
        "metrics": torch.tensor([0.5, float(value), math.nan, 1.0]),
        "epoch": value,
    }


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path / "ckpt")


NO_FILEIO = "kasmina._fileio is not built here (not Linux, or KASMINA_DISABLE_EXTENSION is set)"
needs_fileio = pytest.mark.skipif(ckpt.FILEIO is None, reason=NO_FILEIO)


def _use_write_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make saves take ``path``: ``native`` (kasmina._fileio, the default where it is
    built), ``anonymous`` (the Python calls, unnamed temp files) or ``named`` (the Python
    calls with named temp files: systems without O_TMPFILE)."""
    if path == "native":
        if ckpt.FILEIO is None:
            pytest.skip(NO_FILEIO)
        return
    monkeypatch.setattr(ckpt, "FILEIO", None)
    if path == "named":
        monkeypatch.setattr(durable_io, "_ANONYMOUS_FLAGS", 0)


@pytest.fixture(params=["native", "anonymous", "named"])
def writer(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CheckpointManager:
    """A manager on each write path (see :func:`_use_write_path`): the save's tests run with all three."""
    _use_write_path(request.param, monkeypatch)
    return CheckpointManager(tmp_path / "ckpt")


@pytest.fixture(params=["anonymous", "named"])
def python_writer(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CheckpointManager:
    """A manager on the Python write paths, whose system calls the fault tests replace
    (the native path's faults are real ones: test_native_*)."""
    _use_write_path(request.param, monkeypatch)
    return CheckpointManager(tmp_path / "ckpt")


@pytest.fixture
def python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves make their system calls from Python (tests that watch or replace them)."""
    _use_write_path("anonymous", monkeypatch)


# ---- round trip and format ---------------------------------------------------------------
def test_round_trip_keeps_every_value_and_type(writer: CheckpointManager) -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    state_data = {
        "lifecycle_state": kasmina.ExtendedLifecycle.GRAFTING,
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.tensor([-(2**40), 2**40]),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "view": base[:, ::2].T,  # non-contiguous view of a bigger storage
        "same": base,  # shares storage with "view"
        "nested": {"list": [1, 2.5, "x", None, True, torch.ones(2)], "tuple": (1, 2)},
        "nan": math.nan,
        "inf": -math.inf,
    }
    blueprint = {"0.weight": torch.randn(4, 4, requires_grad=True), "0.bias": torch.randn(4)}
    checkpoint_id = writer.save_checkpoint("enc.block-1", 7, state_data, blueprint, "high", metadata={"epoch": 12})
    out = writer.restore_checkpoint(checkpoint_id)
    assert out["version"] == 2 and out["source_version"] == 2
    assert (out["layer_id"], out["seed_id"], out["priority"], out["lifecycle_state"]) == ("enc.block-1", 7, "high", 3)
    got = out["state_data"]
    for key in ("f32", "bf16", "f16", "i64", "i8", "u8", "flags", "scalar", "empty", "view", "same"):
        assert got[key].dtype == state_data[key].dtype and torch.equal(got[key], state_data[key]), key
    assert got["lifecycle_state"] == 3 and type(got["lifecycle_state"]) is int
    assert got["nested"]["list"][:5] == [1, 2.5, "x", None, True] and torch.equal(got["nested"]["list"][5], torch.ones(2))
    assert got["nested"]["tuple"] == [1, 2]  # tuples come back as lists (documented)
    assert math.isnan(got["nan"]) and got["inf"] == -math.inf
    assert list(out["blueprint_state"]) == ["0.weight", "0.bias"]
    assert all(torch.equal(out["blueprint_state"][k], blueprint[k].detach()) for k in blueprint)
    assert out["metadata"] == {"epoch": 12}


def test_files_are_safetensors_plus_a_v2_sidecar(manager: CheckpointManager) -> None:
    checkpoint_id = manager.save_checkpoint("L", 3, _state(5, lifecycle=4), {"w": torch.ones(3)})
    payload = manager.active_dir / f"{checkpoint_id}.safetensors"
    sidecar = json.loads((manager.active_dir / f"{checkpoint_id}.json").read_text())
    assert ID_RE.match(checkpoint_id)["layer"] == "L" and ID_RE.match(checkpoint_id)["seed"] == "3"
    assert sidecar["version"] == 2 and sidecar["checkpoint_id"] == checkpoint_id
    assert (sidecar["layer_id"], sidecar["seed_id"], sidecar["priority"]) == ("L", 3, "normal")
    assert (sidecar["lifecycle_state"], sidecar["lifecycle_state_name"]) == (4, "STABILIZATION")
    assert sidecar["payload_size"] == payload.stat().st_size
    assert sidecar["sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert abs(sidecar["timestamp"] - sidecar["created_ms"] / 1000) < 1e-6 and sidecar["created_utc"].startswith("20")
    # a standard safetensors file: the reference library reads it
    tensors = load_file(payload)
    assert torch.equal(tensors["state_data/row"], _state(5, 4)["row"]) and torch.equal(
        tensors["blueprint_state/w"], torch.ones(3)
    )


def test_no_pickle_is_used_to_save_or_restore(manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was used")

    for name in ("dumps", "loads", "dump", "load", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    checkpoint_id = manager.save_checkpoint("L", 0, _state(1), {"w": torch.ones(2)})
    assert manager.restore_checkpoint(checkpoint_id)["state_data"]["epoch"] == 1
    manager.verify(checkpoint_id)


def test_restore_on_cpu_device_keeps_values(manager: CheckpointManager) -> None:
    checkpoint_id = manager.save_checkpoint("L", 0, _state(9), {"w": torch.randn(5)})
    out = manager.restore_checkpoint(checkpoint_id, target_device="cpu")
    assert out["state_data"]["row"].device.type == "cpu"
    assert torch.equal(out["state_data"]["row"], _state(9)["row"])
    with pytest.raises(ValueError, match="not a device"):
        manager.restore_checkpoint(checkpoint_id, target_device="warp-drive")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_restore_on_cuda_keeps_values(manager: CheckpointManager) -> None:
    blueprint = {"w": torch.randn(64, 64)}
    checkpoint_id = manager.save_checkpoint("L", 0, _state(9), blueprint)
    out = manager.restore_checkpoint(checkpoint_id, target_device="cuda")
    assert out["blueprint_state"]["w"].is_cuda and out["state_data"]["row"].is_cuda
    assert torch.equal(out["blueprint_state"]["w"].cpu(), blueprint["w"])
    assert torch.equal(out["state_data"]["row"].cpu(), _state(9)["row"])
    on_gpu = {"w": blueprint["w"].cuda()}  # saving from the GPU works too
    back = manager.restore_checkpoint(manager.save_checkpoint("L", 1, _state(1), on_gpu))
    assert torch.equal(back["blueprint_state"]["w"], blueprint["w"])


def test_durable_false_skips_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, python_path: None) -> None:
    manager = CheckpointManager(tmp_path, durable=False)

    def no_fsync(fd: int) -> None:
        raise AssertionError("fsync called with durable=False")

    monkeypatch.setattr(os, "fsync", no_fsync)
    checkpoint_id = manager.save_checkpoint("L", 0, _state(1))
    assert manager.verify(checkpoint_id).checkpoint_id == checkpoint_id


# ---- listing, ids ------------------------------------------------------------------------
def test_list_is_newest_first_by_parsed_numbers(manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt.time, "time_ns", lambda: 1_000 * 1_000_000)  # every id in one millisecond
    monkeypatch.setattr(ckpt._CLOCK, "_seq", 4)  # sequence numbers 5..16, whatever ran before in this process
    ids = [manager.save_checkpoint("L", 0, _state(i), priority="high") for i in range(12)]
    seqs = [int(ID_RE.match(i)["seq"]) for i in ids]
    assert seqs == sorted(seqs) and str(seqs[-1]) < str(seqs[0])  # string order would be wrong here
    listed = [info.checkpoint_id for info in manager.list_checkpoints(limit=None)]
    assert listed == ids[::-1]
    assert [i.checkpoint_id for i in manager.list_checkpoints(limit=3)] == ids[:-4:-1]


def test_list_filters_and_counts(manager: CheckpointManager) -> None:
    a = manager.save_checkpoint("A", 0, _state(1, lifecycle=2))
    b = manager.save_checkpoint("A", 1, _state(2, lifecycle=3))
    c = manager.save_checkpoint("B", 0, _state(3, lifecycle=2))
    d = manager.save_checkpoint("A", 0, {"x": torch.ones(1)})  # no lifecycle state
    ids = lambda infos: [i.checkpoint_id for i in infos]  # noqa: E731
    assert ids(manager.list_checkpoints()) == [d, c, b, a]
    assert ids(manager.list_checkpoints(layer_id="A")) == [d, b, a]
    assert ids(manager.list_checkpoints(layer_id="A", seed_id=0)) == [d, a]
    assert ids(manager.list_checkpoints(seed_id=0)) == [d, c, a]
    assert ids(manager.list_checkpoints(lifecycle_state=2)) == [c, a]
    assert ids(manager.list_checkpoints(lifecycle_state="GRAFTING")) == [b]
    assert ids(manager.list_checkpoints(lifecycle_state=kasmina.ExtendedLifecycle.TRAINING, layer_id="B")) == [c]
    assert manager.get_latest_checkpoint("A", 0).checkpoint_id == d
    assert manager.get_latest_checkpoint("A", 9) is None
    assert manager.get_checkpoint_count() == 4 and manager.get_checkpoint_count("A", 0) == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="limit"):
            manager.list_checkpoints(limit=bad)
    with pytest.raises(ValueError, match="lifecycle_state"):
        manager.list_checkpoints(lifecycle_state=42)


def test_numbers_are_per_seed_sequences_and_map_back(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints_per_seed=2)
    ids = [manager.save_checkpoint("L", 0, _state(i)) for i in range(4)]
    other = manager.save_checkpoint("L", 1, _state(0))
    assert [manager.verify(i).number for i in ids] == [1, 2, 3, 4] and manager.verify(other).number == 1
    assert manager.get_checkpoint_by_number("L", 0, 4).checkpoint_id == ids[3]
    assert manager.get_checkpoint_by_number("L", 0, 1).checkpoint_id == ids[0]  # archived, still found
    assert manager.get_checkpoint_by_number("L", 0, 1).location == "archive"
    assert manager.get_checkpoint_by_number("L", 0, 99) is None
    reopened = CheckpointManager(tmp_path, max_checkpoints_per_seed=2)  # numbering continues after a restart
    assert reopened.verify(reopened.save_checkpoint("L", 0, _state(9))).number == 5


@needs_fileio
def test_native_saves_committing_together_still_keep_only_the_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two saves choose their retention moves before either commits (so neither counts the
    other); whichever commits last must still archive down to max_checkpoints_per_seed."""
    manager = CheckpointManager(tmp_path, max_checkpoints_per_seed=2, durable=False)
    first = [manager.save_checkpoint("L", 0, _state(i)) for i in range(2)]
    both_chose = threading.Barrier(2, timeout=30)
    real = ckpt.FILEIO

    class Together:
        NAME_TAKEN, NO_ANONYMOUS = real.NAME_TAKEN, real.NO_ANONYMOUS

        @staticmethod
        def commit_pair(*args: object) -> object:
            both_chose.wait()
            return real.commit_pair(*args)

    monkeypatch.setattr(ckpt, "FILEIO", Together)
    saved: list[str] = []
    threads = [threading.Thread(target=lambda i=i: saved.append(manager.save_checkpoint("L", 0, _state(i)))) for i in (10, 11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(saved) == 2
    assert {i.checkpoint_id for i in manager.list_checkpoints()} == set(saved)
    assert sorted(p.stem for p in manager.active_dir.glob("*.json")) == sorted(saved)
    assert {p.stem for p in manager.archive_dir.glob("*.json")} == set(first)


def test_ids_unique_under_8_threads_x_50_saves(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, durable=False)
    saved: dict[str, tuple[int, int]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def work(thread: int) -> None:
        barrier.wait()
        for i in range(50):
            checkpoint_id = manager.save_checkpoint("L", 0, {"thread": thread, "i": i, "t": torch.tensor([thread, i])})
            with lock:
                saved[checkpoint_id] = (thread, i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(saved) == 400
    assert manager.get_checkpoint_count() == 5  # retention moved the rest to archive/
    for checkpoint_id, (thread, i) in saved.items():
        out = manager.restore_checkpoint(checkpoint_id)
        assert (out["state_data"]["thread"], out["state_data"]["i"]) == (thread, i)
        assert out["state_data"]["t"].tolist() == [thread, i]
    assert sorted(manager.verify(i).number for i in saved) == list(range(1, 401))


def test_a_forked_process_draws_its_own_sequence() -> None:
    """Processes start their sequences at random points, so two of them saving one seed
    in one millisecond do not draw the same id (not even one already archived)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next sequence number and leave at once
        os.write(write, str(ckpt._CLOCK.next()[1]).encode())
        os._exit(0)
    os.close(write)
    try:
        child = int(os.read(read, 64))
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    mine = ckpt._CLOCK.next()[1]
    assert abs(child - mine) > 1_000_000


def test_a_taken_id_is_never_overwritten(writer: CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same (ms, seq) from another process: the no-overwrite publish moves on to the next id."""
    first = writer.save_checkpoint("L", 0, _state(1), priority="high")
    ms, seq = (int(x) for x in first.rsplit("_", 2)[1:])
    replies = iter([(ms, seq), (ms, seq + 1000)])
    monkeypatch.setattr(ckpt._CLOCK, "next", lambda: next(replies))
    second = writer.save_checkpoint("L", 0, _state(2), priority="high")
    assert second == f"L_seed0_{ms}_{seq + 1000}"
    assert writer.restore_checkpoint(first)["state_data"]["epoch"] == 1
    assert writer.restore_checkpoint(second)["state_data"]["epoch"] == 2
    assert not [n for n in _files(writer.active_dir) if n.startswith(TEMP_PREFIX)]


def test_a_stray_sidecar_is_not_overwritten(writer: CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> None:
    stray = writer.active_dir / "L_seed0_5_1.json"
    stray.write_text("not mine")
    replies = iter([(5, 1), (5, 2)])
    monkeypatch.setattr(ckpt._CLOCK, "next", lambda: next(replies))
    assert writer.save_checkpoint("L", 0, _state(2)) == "L_seed0_5_2"
    assert stray.read_text() == "not mine" and not (writer.active_dir / "L_seed0_5_1.safetensors").exists()


def _no_links(*args: object, **kwargs: object) -> None:
    """os.link of a file system without hard links."""
    raise OSError(errno.EPERM, "Operation not permitted")


def test_saves_work_without_hard_links(python_writer: CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "link", _no_links)
    ids = [python_writer.save_checkpoint("L", 0, _state(i), priority="high") for i in range(3)]
    assert [python_writer.restore_checkpoint(i)["state_data"]["epoch"] for i in ids] == [0, 1, 2]
    assert not [n for n in _files(python_writer.active_dir) if n.startswith(TEMP_PREFIX)]


# ---- retention and deletion -----------------------------------------------------------------
def test_retention_archives_old_normal_and_low_keeps_high_and_critical(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints_per_seed=3)
    foreign = {"notes.txt": "x", "foreign.json": "{}", "L_seed0_1_1.safetensors.old": "y"}
    for name, text in foreign.items():
        (manager.active_dir / name).write_text(text)
    normal = [manager.save_checkpoint("L", 0, _state(i)) for i in range(3)]
    high = manager.save_checkpoint("L", 0, _state(10), priority="high")
    critical = manager.save_checkpoint("L", 0, _state(11), priority="critical")
    normal += [manager.save_checkpoint("L", 0, _state(i), priority="low" if i == 4 else "normal") for i in (3, 4)]
    other_seed = manager.save_checkpoint("L", 1, _state(0))
    active = {i.checkpoint_id for i in manager.list_checkpoints(limit=None)}
    assert active == {*normal[2:], high, critical, other_seed}
    archived = _files(manager.archive_dir)
    assert archived == {f"{i}{ext}" for i in normal[:2] for ext in (".json", ".safetensors")}
    assert manager.restore_checkpoint(normal[0])["state_data"]["epoch"] == 0  # restorable from archive/
    for name, text in foreign.items():  # never touched
        assert (manager.active_dir / name).read_text() == text


def test_delete_archives_or_removes(manager: CheckpointManager) -> None:
    a = manager.save_checkpoint("L", 0, _state(1))
    b = manager.save_checkpoint("L", 0, _state(2))
    manager.delete_checkpoint(a)
    assert [i.checkpoint_id for i in manager.list_checkpoints()] == [b]
    assert f"{a}.json" in _files(manager.archive_dir)
    manager.delete_checkpoint(a, archive=False)  # gone from archive/ too
    assert _files(manager.archive_dir) == set()
    manager.delete_checkpoint(b, archive=False)
    assert manager.get_checkpoint_count() == 0 and _files(manager.active_dir) == set()
    with pytest.raises(CheckpointNotFoundError, match=b):
        manager.restore_checkpoint(b)
    with pytest.raises(CheckpointNotFoundError):
        manager.delete_checkpoint(b)
    for bad in ("../x", "a/b", "", ".hidden", None, f"{b}\n"):
        with pytest.raises(ValueError, match="not a valid checkpoint id"):
            manager.delete_checkpoint(bad)


# ---- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("layer_id", ["../escape", "a/b", "a\\b", "", ".hidden", "x" * 129, "tab\there", "L\n", None, 3])
def test_unsafe_layer_ids_are_rejected(manager: CheckpointManager, layer_id: object) -> None:
    with pytest.raises(ValueError, match="layer_id"):
        manager.save_checkpoint(layer_id, 0, _state(1))
    assert _files(manager.active_dir) == set() and _files(manager.checkpoint_dir) == {"active", "archive"}


def test_layer_ids_checked_before_are_still_the_only_ones_let_through(manager: CheckpointManager) -> None:
    """Valid layer ids are remembered; nothing else is, however it compares or hashes."""

    class Sneaky(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("L")

    manager.save_checkpoint("L", 0, _state(1))
    for bad in ("L\n", "L/..", Sneaky("../L")):
        with pytest.raises(ValueError, match="layer_id"):
            manager.save_checkpoint(bad, 0, _state(1))
    assert [i.layer_id for i in manager.list_checkpoints()] == ["L"]


@pytest.mark.parametrize("nbytes", [0, 1, 64, 1 << 20, checkpoint_format.SMALL_HASH_BYTES - 1, 16 << 10])
def test_small_and_large_inputs_hash_to_the_same_sha256(nbytes: int) -> None:
    data = os.urandom(nbytes)
    hasher = checkpoint_format.sha256_of(nbytes)
    hasher.update(data)
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


@needs_fileio
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=700), cuts=st.lists(st.integers(0, 700), max_size=4), portable=st.booleans())
def test_native_sha256_matches_hashlib(data: bytes, cuts: list[int], portable: bool) -> None:
    bounds = sorted({min(cut, len(data)) for cut in cuts})
    pieces = tuple(data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True))
    assert ckpt.FILEIO.sha256_hex(pieces, portable) == hashlib.sha256(data).hexdigest()


@needs_fileio
@pytest.mark.parametrize("portable", [False, True], ids=["fastest", "portable"])
def test_native_sha256_of_large_and_typed_buffers(portable: bool) -> None:
    """Chunks past the size hashed with the GIL released, and tensor bytes as the encoder
    hands them over (float arrays: buffers of another format)."""
    data = torch.randn(300_000).numpy()
    pieces = (b"header", data, memoryview(data).cast("B")[:1001], b"")
    expected = hashlib.sha256(b"header" + data.tobytes() + data.tobytes()[:1001]).hexdigest()
    assert ckpt.FILEIO.sha256_hex(pieces, portable) == expected
    with pytest.raises(TypeError):
        ckpt.FILEIO.sha256_hex(["not", "a", "tuple"])


@needs_fileio
@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="SHA-NI is an x86-64 feature")
def test_native_sha256_uses_the_sha_extensions_where_the_cpu_has_them() -> None:
    """So that the tests above compare the SHA-NI rounds, not the portable ones twice."""
    flags = Path("/proc/cpuinfo").read_text().split()
    assert ckpt.FILEIO.SHA_NI == ("sha_ni" in flags and "sse4_1" in flags and "ssse3" in flags)


_texts = st.text(max_size=12)
_ints = st.integers(min_value=-(2**70), max_value=2**70)


@settings(max_examples=300, deadline=None)
@given(
    info=st.builds(
        checkpoint_format.CheckpointInfo,
        checkpoint_id=_texts,
        kind=_texts,
        layer_id=_texts,
        seed_id=st.none() | _ints,
        number=_ints,
        created_ms=st.integers(min_value=0, max_value=2**53) | _ints,
        seq=_ints,
        timestamp=st.floats() | st.integers(min_value=0, max_value=2**53).map(lambda ms: ms / 1000),
        priority=_texts,
        lifecycle_state=st.none() | st.integers(min_value=0, max_value=len(STATE_NAMES) - 1),
        payload_file=_texts,
        payload_size=_ints,
        sha256=st.none() | _texts,
        version=_ints,
    ),
    same_ms=st.booleans(),
)
def test_the_sidecar_template_writes_the_canonical_json(info: checkpoint_format.CheckpointInfo, same_ms: bool) -> None:
    if same_ms and info.created_ms >= 0:
        info = info._replace(timestamp=info.created_ms / 1000)
    body = info._asdict()
    del body["location"]
    body["format"] = checkpoint_format.SIDECAR_FORMAT
    body["lifecycle_state_name"] = None if info.lifecycle_state is None else STATE_NAMES[info.lifecycle_state]
    try:  # created_utc derived as build_sidecar derives it: what is tested here is the JSON
        same = info.created_ms / 1000 == info.timestamp
        utc = checkpoint_format._utc_text(info.created_ms) if same else checkpoint_format._utc_iso(info.timestamp)
    except (ValueError, OverflowError, OSError) as exc:  # outside what datetime can write
        with pytest.raises(type(exc)):
            checkpoint_format.build_sidecar(info)
        return
    body["created_utc"] = utc
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    expected = canonical[:-1] + b',"sidecar_sha256":"%s"}' % hashlib.sha256(canonical).hexdigest().encode()
    assert checkpoint_format.build_sidecar(info) == expected


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed_id": -1}, ValueError, "seed_id -1"),
        ({"seed_id": True}, TypeError, "seed_id"),
        ({"seed_id": "3"}, TypeError, "seed_id"),
        ({"priority": "urgent"}, ValueError, "priority 'urgent'"),
        ({"state_data": [1, 2]}, TypeError, "state_data must be a dict"),
        ({"state_data": {"x": object()}}, TypeError, "'state_data/x' has type object"),
        ({"state_data": {"x": {1: 2}}}, TypeError, "'state_data/x': dict keys must be strings"),
        ({"state_data": {"lifecycle_state": 99}}, ValueError, "out of range"),
        ({"state_data": {"x": torch.zeros(2, dtype=torch.complex64)}}, TypeError, "complex64"),
        ({"state_data": {"x": torch.zeros(2).to_sparse()}}, TypeError, "'state_data/x': only dense tensors"),
        (
            {"state_data": {"x": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)}},
            TypeError,
            "dense",
        ),
        ({"state_data": {"x": torch.zeros(2, device="meta")}}, ValueError, "'state_data/x' is on the meta device"),
        ({"blueprint_state": [torch.ones(1)]}, TypeError, "blueprint_state"),
    ],
)
def test_bad_input_raises_and_writes_nothing(manager: CheckpointManager, kwargs: dict, error: type, match: str) -> None:
    args = {"layer_id": "L", "seed_id": 0, "state_data": _state(1), **kwargs}
    with pytest.raises(error, match=match):
        manager.save_checkpoint(**args)
    assert _files(manager.active_dir) == set()


def test_bad_manager_arguments() -> None:
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="max_checkpoints_per_seed"):
            CheckpointManager("/tmp/unused-kasmina-ckpt", max_checkpoints_per_seed=bad)
    with pytest.raises(TypeError, match="durable"):
        CheckpointManager("/tmp/unused-kasmina-ckpt", durable="yes")


# ---- corruption ----------------------------------------------------------------------------
def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def _damage(manager: CheckpointManager, checkpoint_id: str, how: str) -> str:
    payload = manager.active_dir / f"{checkpoint_id}.safetensors"
    sidecar = manager.active_dir / f"{checkpoint_id}.json"
    if how == "bit flip":
        _flip_bit(payload, payload.stat().st_size - 3)
        return payload.name
    if how == "bit flip in header":
        _flip_bit(payload, 20)
        return payload.name
    if how == "truncation":
        payload.write_bytes(payload.read_bytes()[:-10])
        return payload.name
    if how == "missing sidecar":
        sidecar.unlink()
        return payload.name
    if how == "garbled sidecar":
        sidecar.write_bytes(sidecar.read_bytes()[:40])
        return sidecar.name
    if how == "edited sidecar":  # still valid JSON, but not what was written
        body = json.loads(sidecar.read_text())
        body["priority"] = "critical"
        sidecar.write_text(json.dumps(body))
        return sidecar.name
    if how == "missing payload":
        payload.unlink()
        return sidecar.name
    raise AssertionError(how)


DAMAGE = [
    "bit flip",
    "bit flip in header",
    "truncation",
    "missing sidecar",
    "garbled sidecar",
    "edited sidecar",
    "missing payload",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_corruption_is_detected_and_named(manager: CheckpointManager, how: str) -> None:
    checkpoint_id = manager.save_checkpoint("L", 0, _state(1), {"w": torch.randn(100)})
    damaged = _damage(manager, checkpoint_id, how)
    with pytest.raises(CheckpointCorruptError, match=re.escape(damaged)):
        manager.restore_checkpoint(checkpoint_id)
    with pytest.raises(CheckpointCorruptError, match=re.escape(damaged)):
        manager.verify(checkpoint_id)


def test_recovery_skips_every_kind_of_damage(manager: CheckpointManager) -> None:
    good = manager.save_checkpoint("L", 0, _state(100), {"w": torch.full((10,), 100.0)}, priority="high")
    damaged = {}
    for i, how in enumerate(DAMAGE):
        checkpoint_id = manager.save_checkpoint("L", 0, _state(i), {"w": torch.full((10,), float(i))}, priority="high")
        damaged[checkpoint_id] = how
        _damage(manager, checkpoint_id, how)
    manager.save_checkpoint("L", 1, _state(7), priority="high")  # another seed: not a candidate
    result = CheckpointRecovery(manager).recover_seed_state("L", 0)
    assert result.checkpoint_id == good and result.location == "active"
    assert result.checkpoint["state_data"]["epoch"] == 100
    assert [s.checkpoint_id for s in result.skipped] == list(damaged)[::-1]
    for skipped in result.skipped:
        assert skipped.checkpoint_id in skipped.reason and skipped.reason
    # listing shows only the checkpoints whose sidecars parse; verify flags the damaged ones
    for info in manager.list_checkpoints(layer_id="L", seed_id=0, limit=None):
        if info.checkpoint_id in damaged:
            with pytest.raises(CheckpointCorruptError):
                manager.verify(info.checkpoint_id)


def test_recovery_falls_back_to_archive_and_reports_when_nothing_is_left(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints_per_seed=1)
    old = manager.save_checkpoint("L", 0, _state(1))
    new = manager.save_checkpoint("L", 0, _state(2))
    _damage(manager, new, "bit flip")
    result = CheckpointRecovery(manager).recover_seed_state("L", 0)
    assert (result.checkpoint_id, result.location) == (old, "archive")
    assert [s.checkpoint_id for s in result.skipped] == [new] and "sha256" in result.skipped[0].reason
    _flip_bit(manager.archive_dir / f"{old}.safetensors", 30)
    with pytest.raises(CheckpointNotFoundError, match="skipped 2") as info:
        CheckpointRecovery(manager).recover_seed_state("L", 0)
    assert len(info.value.skipped) == 2
    with pytest.raises(CheckpointNotFoundError, match="no usable checkpoint"):
        CheckpointRecovery(manager).recover_seed_state("L", 5)


def test_recovery_reads_a_candidate_archived_since_it_was_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints_per_seed=1)
    first = manager.save_checkpoint("L", 0, _state(1))
    listed = manager.candidates(("L", "seed", 0))
    assert listed == [(first, manager.active_dir)]
    second = manager.save_checkpoint("L", 0, _state(2))  # retention archives the first meanwhile
    _damage(manager, second, "bit flip")
    monkeypatch.setattr(manager, "candidates", lambda key: [(second, manager.active_dir), *listed])
    result = CheckpointRecovery(manager).recover_seed_state("L", 0)
    assert (result.checkpoint_id, result.location) == (first, "archive")
    assert [s.checkpoint_id for s in result.skipped] == [second]


# ---- disk full -----------------------------------------------------------------------------
def _fail_in(monkeypatch: pytest.MonkeyPatch, folder: Path, call: str, after: int) -> None:
    """Make os.<call> raise ENOSPC for files under ``folder`` once ``after`` calls passed
    (os.writev writes part of its first buffer first, like a real full disk)."""
    real = getattr(os, call)
    calls = {"n": 0}

    def fake(fd: int, *args: object) -> object:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(folder)) and (TEMP_PREFIX in target or target.endswith(" (deleted)")):
            calls["n"] += 1
            if calls["n"] > after:
                if call == "writev":
                    os.write(fd, bytes(args[0][0])[:7])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *args)

    monkeypatch.setattr(os, call, fake)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to map fds to files")
@pytest.mark.parametrize(("call", "after"), [("writev", 0), ("writev", 1), ("fsync", 0), ("fsync", 1)])
def test_disk_full_keeps_every_earlier_checkpoint(
    python_writer: CheckpointManager, monkeypatch: pytest.MonkeyPatch, call: str, after: int
) -> None:
    earlier = [python_writer.save_checkpoint("L", 0, _state(i), {"w": torch.randn(64)}) for i in range(3)]
    before = _files(python_writer.active_dir)
    with monkeypatch.context() as patch:
        _fail_in(patch, python_writer.active_dir, call, after)  # after=1: the payload goes through, the sidecar fails
        with pytest.raises(CheckpointWriteError, match="no space left on device") as info:
            python_writer.save_checkpoint("L", 0, _state(99), {"w": torch.randn(64)})
    assert info.value.errno == errno.ENOSPC and str(python_writer.active_dir) in str(info.value)
    assert _files(python_writer.active_dir) == before  # temp files gone, nothing half-written
    assert [i.checkpoint_id for i in python_writer.list_checkpoints()] == earlier[::-1]
    for checkpoint_id in earlier:
        python_writer.verify(checkpoint_id)
    assert CheckpointRecovery(python_writer).recover_seed_state("L", 0).checkpoint_id == earlier[-1]
    assert python_writer.restore_checkpoint(python_writer.save_checkpoint("L", 0, _state(5)))["state_data"]["epoch"] == 5


# ---- temp files, the index -----------------------------------------------------------------------
def test_stale_temp_files_are_cleaned_on_open_and_others_kept(tmp_path: Path) -> None:
    CheckpointManager(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / "active" / f"{TEMP_PREFIX}{int(dead.stdout)}-0-payload.tmp"
    live = tmp_path / "archive" / f"{TEMP_PREFIX}{os.getpid()}-0-payload.tmp"
    other = tmp_path / "active" / ".kasmina-tmp-notapid.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    manager = CheckpointManager(tmp_path)
    assert manager.cleaned_temp_files == [stale]
    assert not stale.exists() and live.exists() and other.exists()
    assert manager.list_checkpoints() == []


def test_interrupted_archive_moves_are_finished_on_open(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints_per_seed=5)
    a = manager.save_checkpoint("L", 0, _state(1))
    b = manager.save_checkpoint("L", 0, _state(2))
    os.replace(manager.active_dir / f"{a}.json", manager.archive_dir / f"{a}.json")  # crash after the sidecar moved
    os.replace(manager.active_dir / f"{b}.safetensors", manager.archive_dir / f"{b}.safetensors")  # the other order
    reopened = CheckpointManager(tmp_path)
    assert reopened.list_checkpoints() == [] and len(_files(reopened.archive_dir)) == 4
    assert reopened.restore_checkpoint(a)["state_data"]["epoch"] == 1
    assert reopened.restore_checkpoint(b)["state_data"]["epoch"] == 2


def test_index_is_cached_and_follows_other_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_scan, "SETTLE_NS", 0)  # a folder counts as settled at once (no racy window in the test)
    reads: list[str] = []
    real_read = ckpt_index.SidecarIndex._read
    monkeypatch.setattr(ckpt_index.SidecarIndex, "_read", lambda self, path: reads.append(path.name) or real_read(self, path))
    first, second = CheckpointManager(tmp_path), CheckpointManager(tmp_path)
    a = first.save_checkpoint("L", 0, _state(1))
    assert [i.checkpoint_id for i in first.list_checkpoints()] == [a] and reads == []  # own write: no re-read
    assert [i.checkpoint_id for i in second.list_checkpoints()] == [a] and reads == [f"{a}.json"]
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or real_scandir(path))
    second.list_checkpoints()
    assert scans == []  # unchanged folder: one stat, no listing, no reads
    b = first.save_checkpoint("L", 1, _state(2))
    first.delete_checkpoint(a, archive=False)
    assert [i.checkpoint_id for i in second.list_checkpoints()] == [b] and reads[-1] == f"{b}.json"
    (tmp_path / "active" / "broken.json").write_text("{")
    assert [i.checkpoint_id for i in second.list_checkpoints()] == [b]
    assert "broken.json" in second._active.unreadable


def test_errors_are_exported() -> None:
    for name in ("CheckpointManager", "CheckpointRecovery", "CheckpointError", "CheckpointCorruptError",
                 "CheckpointNotFoundError", "CheckpointWriteError", "UnsafeCheckpointError"):  # fmt: skip
        assert getattr(kasmina, name) is getattr(ckpt, name) and name in kasmina.__all__
    assert issubclass(kasmina.CheckpointCorruptError, kasmina.CheckpointError)


def test_index_snapshot_speeds_up_a_cold_start_and_never_hides_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_index, "_CACHE_AFTER_PARSING", 2)
    writer = CheckpointManager(tmp_path, durable=False)
    ids = [writer.save_checkpoint("L", i, _state(i), priority="high") for i in range(4)]
    CheckpointManager(tmp_path).list_checkpoints()  # a cold start reads 4 sidecars and leaves a snapshot
    cache = tmp_path / ".index-cache-active.json"
    assert cache.exists()
    reads: list[str] = []
    real_read = ckpt_index.SidecarIndex._read
    monkeypatch.setattr(ckpt_index.SidecarIndex, "_read", lambda self, path: reads.append(path.name) or real_read(self, path))
    assert [i.checkpoint_id for i in CheckpointManager(tmp_path).list_checkpoints()] == ids[::-1] and reads == []
    # a sidecar replaced since the snapshot (a new file renamed over it) is read again; a deleted one is gone
    sidecar = tmp_path / "active" / f"{ids[0]}.json"
    replacement = tmp_path / "replacement.json"
    replacement.write_bytes(sidecar.read_bytes())
    os.replace(replacement, sidecar)
    writer.delete_checkpoint(ids[1], archive=False)
    listed = CheckpointManager(tmp_path).list_checkpoints()
    assert [i.checkpoint_id for i in listed] == [ids[3], ids[2], ids[0]] and reads == [sidecar.name]
    cache.write_text("{garbage")  # a broken snapshot is ignored
    assert len(CheckpointManager(tmp_path).list_checkpoints()) == 3


def test_atomic_write_replaces_or_refuses_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kasmina.durable_io import atomic_write

    target = tmp_path / "file.bin"
    atomic_write(target, b"one")
    atomic_write(target, [b"tw", memoryview(b"o")])  # replaces by default
    assert target.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        atomic_write(target, b"three", overwrite=False)
    assert target.read_bytes() == b"two"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_write(tmp_path / "durable.bin", b"x")
    assert len(synced) == 2  # the file and its folder
    atomic_write(tmp_path / "fast.bin", b"x", durable=False)
    assert len(synced) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["durable.bin", "fast.bin", "file.bin"]


@pytest.mark.skipif(not durable_io._ANONYMOUS_FLAGS, reason="no O_TMPFILE or no /proc/self/fd here")
def test_temp_files_are_unnamed_where_the_system_allows(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch, python_path: None
) -> None:
    created: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: created.append(str(path)) or real_open(path, flags, *a, **k))
    checkpoint_id = manager.save_checkpoint("L", 0, _state(1))
    assert created and not [path for path in created if TEMP_PREFIX in path]
    assert manager.restore_checkpoint(checkpoint_id)["state_data"]["epoch"] == 1


def test_a_folder_refusing_unnamed_files_gets_named_ones(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch, python_path: None
) -> None:
    real_open = os.open
    created: list[str] = []

    def refuse_tmpfile(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        created.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_tmpfile)
    ids = [manager.save_checkpoint("L", 0, _state(i), priority="high") for i in range(2)]
    assert [manager.restore_checkpoint(i)["state_data"]["epoch"] for i in ids] == [0, 1]
    assert len([path for path in created if TEMP_PREFIX in path]) == 4  # payload and sidecar, twice
    assert not [n for n in _files(manager.active_dir) if n.startswith(TEMP_PREFIX)]


@pytest.mark.skipif(not durable_io._ANONYMOUS_FLAGS, reason="no O_TMPFILE or no /proc/self/fd here")
def test_unnamed_files_that_cannot_be_linked_are_saved_as_named_copies(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch, python_path: None
) -> None:
    real_link = os.link

    def no_proc_links(src: str, dst: str, **kwargs: object) -> None:
        if str(src).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", src)  # a /proc that is not ours
        real_link(src, dst, **kwargs)

    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "link", no_proc_links)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    ids = [manager.save_checkpoint("L", 0, _state(i), {"w": torch.arange(5000.0)}, priority="high") for i in range(2)]
    copies = [path for path in synced if path.endswith("-copy.tmp")]
    assert len(copies) == 2  # the first save's payload and sidecar were copied (and fsynced); the second used named temps
    for epoch, checkpoint_id in enumerate(ids):
        out = manager.restore_checkpoint(checkpoint_id)
        assert out["state_data"]["epoch"] == epoch and torch.equal(out["blueprint_state"]["w"], torch.arange(5000.0))
    assert not [n for n in _files(manager.active_dir) if n.startswith(TEMP_PREFIX)]


def _fail_nth(monkeypatch: pytest.MonkeyPatch, call: str, nth: int, applies: Callable[..., bool] = lambda *a: True) -> None:
    """Make the ``nth`` call of os.<call> for which ``applies(*args)`` holds raise ENOSPC."""
    real = getattr(os, call)
    seen = [0]

    def fake(*args: object, **kwargs: object) -> object:
        if applies(*args):
            seen[0] += 1
            if seen[0] == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, call, fake)


@pytest.mark.parametrize(("stage", "nth"), [("link", 1), ("link", 2), ("folder fsync", 1)])
def test_a_failed_publish_keeps_nothing_of_the_save(
    python_writer: CheckpointManager, monkeypatch: pytest.MonkeyPatch, stage: str, nth: int
) -> None:
    """link 1: the payload's final name; link 2: the sidecar's; then the folder fsync."""
    earlier = [python_writer.save_checkpoint("L", 0, _state(i)) for i in range(2)]
    before = _files(python_writer.active_dir)
    with monkeypatch.context() as patch:
        if stage == "folder fsync":
            _fail_nth(patch, "fsync", nth, lambda fd: stat.S_ISDIR(os.fstat(fd).st_mode))
        else:
            _fail_nth(patch, stage, nth)
        with pytest.raises(CheckpointWriteError, match="no space left on device"):
            python_writer.save_checkpoint("L", 0, _state(9))
    assert _files(python_writer.active_dir) == before
    assert [i.checkpoint_id for i in python_writer.list_checkpoints()] == earlier[::-1]


@pytest.mark.parametrize("nth", [1, 2])
def test_without_hard_links_a_failed_rename_leaves_no_placeholder(
    python_writer: CheckpointManager, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    """Without hard links a final name is reserved by an empty placeholder, then the temp
    file is renamed onto it (rename 1: the payload, 2: the sidecar)."""
    monkeypatch.setattr(os, "link", _no_links)
    earlier = python_writer.save_checkpoint("L", 0, _state(1), priority="high")
    before = _files(python_writer.active_dir)
    with monkeypatch.context() as patch:
        _fail_nth(patch, "replace", nth)
        with pytest.raises(CheckpointWriteError, match="no space left on device"):
            python_writer.save_checkpoint("L", 0, _state(2), priority="high")
    assert _files(python_writer.active_dir) == before
    assert [i.checkpoint_id for i in python_writer.list_checkpoints()] == [earlier]


def test_a_large_payload_is_hashed_while_it_is_written_and_read(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt, "BACKGROUND_HASH_BYTES", 1 << 20)
    monkeypatch.setattr(checkpoint_format, "BACKGROUND_HASH_BYTES", 1 << 20)
    sections = {"w": torch.arange(300_000, dtype=torch.float32), "b": [torch.ones(3), "x"]}
    background = checkpoint_format.encode_payload(sections)
    background.hash_in_background()
    assert background.sha256 == checkpoint_format.encode_payload(sections).sha256
    assert background.sha256 == hashlib.sha256(b"".join(bytes(c) for c in background.chunks)).hexdigest()
    monkeypatch.setattr(ckpt, "_READ_PIECE_BYTES", 256 << 10)  # 16 pieces of a 4 MB payload
    weights = torch.arange(1 << 20, dtype=torch.float32)
    checkpoint_id = manager.save_checkpoint("L", 0, _state(1), {"w": weights}, priority="high")
    assert torch.equal(manager.restore_checkpoint(checkpoint_id)["blueprint_state"]["w"], weights)
    payload = manager.active_dir / f"{checkpoint_id}.safetensors"
    original = payload.read_bytes()
    for offset in (100, len(original) // 2, len(original) - 1):  # in the first, a middle and the last piece
        damaged = bytearray(original)
        damaged[offset] ^= 1
        payload.write_bytes(damaged)
        with pytest.raises(CheckpointCorruptError, match="fails its sha256 check"):
            manager.restore_checkpoint(checkpoint_id)
    payload.write_bytes(original)
    real_readv = os.readv
    reads = [0]

    def shrinking_readv(fd: int, buffers: list) -> int:  # the file is cut short while it is read
        reads[0] += 1
        return 0 if reads[0] == 3 else real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", shrinking_readv)
    with pytest.raises(CheckpointCorruptError, match="ended early"):
        manager.restore_checkpoint(checkpoint_id)
    monkeypatch.setattr(os, "readv", real_readv)
    assert not [t for t in threading.enumerate() if t.name == "kasmina-sha256"]
    assert torch.equal(manager.restore_checkpoint(checkpoint_id)["blueprint_state"]["w"], weights)


def test_short_writes_are_completed(python_writer: CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev

    def short_writev(fd: int, buffers: list) -> int:  # the kernel may write less than asked
        return real(fd, [bytes(memoryview(buffers[0]).cast("B")[:5])])

    monkeypatch.setattr(os, "writev", short_writev)
    checkpoint_id = python_writer.save_checkpoint("L", 0, _state(3), {"w": torch.arange(100.0)})
    monkeypatch.undo()
    out = python_writer.restore_checkpoint(checkpoint_id)
    assert out["state_data"]["epoch"] == 3 and torch.equal(out["blueprint_state"]["w"], torch.arange(100.0))


# ---- the native write path (kasmina._fileio) ---------------------------------------------------
@needs_fileio
@pytest.mark.parametrize("python", ["anonymous", "named"])
def test_native_and_python_saves_write_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, python: str) -> None:
    data = {**_state(4), "w": torch.randn(3, 7), "empty": torch.zeros(0), "half": torch.arange(6).half()}
    monkeypatch.setattr(ckpt._CLOCK, "next", lambda: (1_700_000_000_123, 42))
    native = CheckpointManager(tmp_path / "native")
    native_id = native.save_checkpoint("L", 3, data, {"b": torch.ones(2)}, priority="low", metadata={"note": "x"})
    _use_write_path(python, monkeypatch)
    other = CheckpointManager(tmp_path / "python")
    assert other.save_checkpoint("L", 3, data, {"b": torch.ones(2)}, priority="low", metadata={"note": "x"}) == native_id
    for name in (f"{native_id}.safetensors", f"{native_id}.json"):
        assert (native.active_dir / name).read_bytes() == (other.active_dir / name).read_bytes()
    assert sorted(p.name for p in native.active_dir.iterdir()) == sorted(p.name for p in other.active_dir.iterdir())


_FSIZE_SAVE = """
import resource, signal, sys, torch
from kasmina import checkpoint as ckpt
assert ckpt.FILEIO is not None
manager = ckpt.CheckpointManager(sys.argv[1])
earlier = manager.save_checkpoint("L", 0, {"epoch": 1, "w": torch.zeros(int(sys.argv[3]))})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    manager.save_checkpoint("L", 0, {"epoch": 2, "w": torch.zeros(int(sys.argv[3]))})
except ckpt.CheckpointWriteError as exc:
    print(exc.errno, exc)
print(earlier)
"""


@needs_fileio
@pytest.mark.parametrize(("limit", "floats", "stage"), [(1000, 4096, "writing the payload"), (450, 8, "writing the sidecar")])
def test_native_save_that_fails_leaves_nothing_and_keeps_earlier_checkpoints(
    tmp_path: Path, limit: int, floats: int, stage: str
) -> None:
    """A real write failure (EFBIG past RLIMIT_FSIZE, in a subprocess): the payload, or
    only the sidecar (a payload of 8 floats is about 300 bytes, its sidecar about 580)."""
    folder = tmp_path / "ckpt"
    run = subprocess.run(
        [sys.executable, "-c", _FSIZE_SAVE, str(folder), str(limit), str(floats)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    error, earlier = run.stdout.splitlines()
    assert error.startswith(f"{errno.EFBIG} ") and f"while {stage} in {folder / 'active'}" in error
    assert "earlier checkpoints are intact" in error
    manager = CheckpointManager(folder)
    assert sorted(p.name for p in manager.active_dir.iterdir()) == [f"{earlier}.json", f"{earlier}.safetensors"]
    assert [i.checkpoint_id for i in manager.list_checkpoints()] == [earlier]
    assert manager.restore_checkpoint(earlier)["state_data"]["epoch"] == 1


def test_a_retention_move_that_fails_warns_and_is_retried(writer: CheckpointManager) -> None:
    """archive/ unusable (here: a file in its place): the save succeeds, warns, and the
    checkpoint stays listed in active/; the next save once archive/ is back moves it."""
    manager = CheckpointManager(writer.checkpoint_dir, max_checkpoints_per_seed=1)
    first = manager.save_checkpoint("L", 0, _state(1))
    manager.archive_dir.rmdir()
    manager.archive_dir.write_text("in the way")
    with pytest.warns(RuntimeWarning, match=f"retention could not archive {first}"):
        second = manager.save_checkpoint("L", 0, _state(2))
    assert [i.checkpoint_id for i in manager.list_checkpoints()] == [second, first]
    manager.archive_dir.unlink()
    manager.archive_dir.mkdir()
    third = manager.save_checkpoint("L", 0, _state(3))
    assert [i.checkpoint_id for i in manager.list_checkpoints()] == [third]
    assert sorted(p.stem for p in manager.archive_dir.glob("*.json")) == sorted([first, second])
