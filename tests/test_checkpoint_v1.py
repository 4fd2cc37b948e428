"""v1 checkpoints (the original ``.pt`` layout): weights-only reading, in-memory and
on-disk migration, and refusal of pickles that would run code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from kasmina.checkpoint import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointRecovery,
    UnsafeCheckpointError,
)


class _Evil:
    """Pickles to a call of Path.touch(marker): loading it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _write_v1(folder: Path, layer: str, seed: int, ms: int, *, version: bool = True, sidecar: bool = True, extra=None) -> str:
    checkpoint_id = f"{layer}_{seed}_{ms}"
    data = {
        "checkpoint_id": checkpoint_id,
        "layer_id": layer,
        "seed_id": seed,
        "timestamp": ms / 1000,
        "state_data": {"state": 3, "epochs": torch.tensor([5, 6], dtype=torch.int32), "alpha": 0.25},
        "blueprint_state": {"weight": torch.arange(6.0).reshape(2, 3)},
        "metadata": {"note": "v1"},
    }
    if version:
        data["version"] = 1
        data["priority"] = "high"
    data.update(extra or {})
    torch.save(data, folder / f"{checkpoint_id}.pt")
    if sidecar:
        side = {
            "checkpoint_id": checkpoint_id,
            "layer_id": layer,
            "seed_id": seed,
            "timestamp": ms / 1000,
            "priority": data.get("priority", "normal"),
            "lifecycle_state": 3,
            "file_size": (folder / f"{checkpoint_id}.pt").stat().st_size,
        }
        (folder / f"{checkpoint_id}.json").write_text(json.dumps(side))
    return checkpoint_id


@pytest.fixture
def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path)


@pytest.mark.parametrize("version", [True, False])
def test_v1_is_listed_and_restored_migrated_in_memory(manager: CheckpointManager, version: bool) -> None:
    checkpoint_id = _write_v1(manager.active_dir, "layer1", 4, 1_700_000_000_123, version=version)
    [info] = manager.list_checkpoints()
    assert (info.checkpoint_id, info.version, info.layer_id, info.seed_id, info.lifecycle_state) == (
        checkpoint_id,
        1,
        "layer1",
        4,
        3,
    )
    assert info.created_ms == 1_700_000_000_123
    out = manager.restore_checkpoint(checkpoint_id)
    assert out["version"] == 2 and out["source_version"] == 1
    assert out["priority"] == ("high" if version else "normal")  # 'normal' added when absent
    assert "state" not in out["state_data"] and out["state_data"]["lifecycle_state"] == 3  # renamed
    assert torch.equal(out["state_data"]["epochs"], torch.tensor([5, 6], dtype=torch.int32))
    assert torch.equal(out["blueprint_state"]["weight"], torch.arange(6.0).reshape(2, 3))
    assert out["metadata"] == {"note": "v1"}
    assert manager.verify(checkpoint_id).version == 1


def test_retention_leaves_v1_checkpoints_alone(tmp_path: Path) -> None:
    """v1 files were not written by this manager: retention never moves them."""
    manager = CheckpointManager(tmp_path, max_checkpoints_per_seed=2)
    old = [_write_v1(manager.active_dir, "L", 0, 1_000 + i, version=False) for i in range(3)]  # priority normal
    before = {p.name: p.read_bytes() for p in manager.active_dir.iterdir()}
    new = [manager.save_checkpoint("L", 0, {"epoch": i}) for i in range(3)]
    for name, data in before.items():
        assert (manager.active_dir / name).read_bytes() == data
    active = {i.checkpoint_id for i in manager.list_checkpoints("L", 0, limit=None)}
    assert active == {*old, *new[1:]}  # the oldest new one was archived, no v1 one


def test_migrate_rewrites_as_v2_keeping_backups(manager: CheckpointManager) -> None:
    checkpoint_id = _write_v1(manager.active_dir, "layer1", 4, 1_700_000_000_123)
    original_pt = (manager.active_dir / f"{checkpoint_id}.pt").read_bytes()
    original_json = (manager.active_dir / f"{checkpoint_id}.json").read_bytes()
    before = manager.restore_checkpoint(checkpoint_id)
    assert manager.migrate(manager.active_dir / f"{checkpoint_id}.pt") == checkpoint_id
    files = {p.name for p in manager.active_dir.iterdir()}
    assert files == {f"{checkpoint_id}{ext}" for ext in (".safetensors", ".json", ".pt.bak", ".json.bak")}
    assert (manager.active_dir / f"{checkpoint_id}.pt.bak").read_bytes() == original_pt
    assert (manager.active_dir / f"{checkpoint_id}.json.bak").read_bytes() == original_json
    sidecar = json.loads((manager.active_dir / f"{checkpoint_id}.json").read_text())
    assert sidecar["version"] == 2 and sidecar["priority"] == "high" and sidecar["lifecycle_state"] == 3
    after = manager.restore_checkpoint(checkpoint_id)
    assert after["source_version"] == 2
    for section in ("state_data", "blueprint_state"):
        for key, value in before[section].items():
            assert torch.equal(after[section][key], value) if isinstance(value, torch.Tensor) else after[section][key] == value
    [info] = manager.list_checkpoints()
    assert info.version == 2 and info.sha256 is not None
    assert manager.migrate(manager.active_dir / f"{checkpoint_id}.pt") == checkpoint_id  # idempotent


def test_migrate_without_sidecar_and_after_an_interrupted_run(manager: CheckpointManager, monkeypatch) -> None:
    checkpoint_id = _write_v1(manager.active_dir, "L", 0, 1_000, sidecar=False, version=False)
    pt = manager.active_dir / f"{checkpoint_id}.pt"
    real_unlink = __import__("os").unlink

    def crash_on_pt(path, *args, **kwargs):
        if str(path) == str(pt):
            raise KeyboardInterrupt("crash after the commit")
        return real_unlink(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("os.unlink", crash_on_pt)
        with pytest.raises(KeyboardInterrupt):
            manager.migrate(pt)
    assert pt.exists()  # the v2 files are committed, the v1 file still there
    assert manager.restore_checkpoint(checkpoint_id)["source_version"] == 2
    assert manager.migrate(pt) == checkpoint_id and not pt.exists() and (manager.active_dir / f"{checkpoint_id}.pt.bak").exists()
    assert manager.restore_checkpoint(checkpoint_id)["state_data"]["lifecycle_state"] == 3


def test_migrate_rejects_files_outside_the_manager(manager: CheckpointManager, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoint_id = _write_v1(elsewhere, "L", 0, 1_000)
    with pytest.raises(ValueError, match=r"not a v1 \.pt file in"):
        manager.migrate(elsewhere / f"{checkpoint_id}.pt")
    with pytest.raises(ValueError, match=r"not a v1 \.pt file in"):
        manager.migrate(manager.active_dir / "../elsewhere" / f"{checkpoint_id}.pt")


@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(manager: CheckpointManager, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    checkpoint_id = _write_v1(manager.active_dir, "L", 0, 2_000)
    pt = manager.active_dir / f"{checkpoint_id}.pt"
    payload = {"layer_id": "L", "seed_id": 0, "state_data": {"state": 1}, "metadata": {"x": _Evil(marker)}}
    if kind == "torch.save":
        torch.save(payload, pt)
    else:
        pt.write_bytes(pickle.dumps(payload, protocol=2))
    before = {p.name for p in manager.active_dir.iterdir()}
    with pytest.raises(UnsafeCheckpointError, match=f"refusing v1 checkpoint .*{pt.name}.*Nothing in it was executed"):
        manager.restore_checkpoint(checkpoint_id)
    with pytest.raises(UnsafeCheckpointError):
        manager.verify(checkpoint_id)
    with pytest.raises(UnsafeCheckpointError):
        manager.migrate(pt)
    assert not marker.exists()
    assert {p.name for p in manager.active_dir.iterdir()} == before  # migrate wrote nothing
    older = _write_v1(manager.active_dir, "L", 0, 1_000)
    result = CheckpointRecovery(manager).recover_seed_state("L", 0)
    assert result.checkpoint_id == older and result.skipped[0].checkpoint_id == checkpoint_id
    assert "refusing" in result.skipped[0].reason and not marker.exists()
    assert "will likely succeed" not in result.skipped[0].reason  # torch's advice to load it unsafely is left out


def test_a_bit_flip_in_a_v1_tensor_fails_its_crc(manager: CheckpointManager) -> None:
    checkpoint_id = _write_v1(manager.active_dir, "L", 0, 1_000)
    pt = manager.active_dir / f"{checkpoint_id}.pt"
    raw = bytearray(pt.read_bytes())
    at = raw.find(torch.arange(6.0).numpy().tobytes())  # the stored blueprint weight
    raw[at + 5] ^= 0x10
    pt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match="fails its CRC-32 check"):
        manager.restore_checkpoint(checkpoint_id)
    with pytest.raises(CheckpointCorruptError):
        manager.migrate(pt)


def test_a_v1_id_that_reads_as_a_layer_id_is_recovered_by_what_it_holds(manager: CheckpointManager) -> None:
    checkpoint_id = _write_v1(manager.active_dir, "enc_layer", 5, 1_700_000_000_000)  # also fits <layer>_layer_<ms>_<seq>
    recovery = CheckpointRecovery(manager)
    assert recovery.recover_seed_state("enc_layer", 5).checkpoint_id == checkpoint_id
    with pytest.raises(CheckpointNotFoundError) as info:
        recovery.recover_layer_state("enc")
    assert [s.checkpoint_id for s in info.value.skipped] == [checkpoint_id]
    assert "holds the checkpoint of layer 'enc_layer' seed 5" in info.value.skipped[0].reason


class _Getpid:
    """Pickles to a call of os.getpid, from a module torch's weights-only loader blocks."""

    def __reduce__(self) -> tuple:
        return (os.getpid, ())


def test_the_refusal_names_what_torch_objected_to(manager: CheckpointManager) -> None:
    checkpoint_id = _write_v1(manager.active_dir, "L", 0, 1_000)
    torch.save({"layer_id": "L", "seed_id": 0, "state_data": {"x": _Getpid()}}, manager.active_dir / f"{checkpoint_id}.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        manager.restore_checkpoint(checkpoint_id)
    assert "getpid" in str(info.value) and "will likely succeed" not in str(info.value)


def test_forced_unsafe_torch_load_is_refused(manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint_id = _write_v1(manager.active_dir, "L", 0, 1_000)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        manager.restore_checkpoint(checkpoint_id)


def test_damaged_v1_files_are_detected(manager: CheckpointManager) -> None:
    truncated = _write_v1(manager.active_dir, "L", 0, 1_000)
    pt = manager.active_dir / f"{truncated}.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    with pytest.raises(CheckpointCorruptError, match=pt.name):
        manager.restore_checkpoint(truncated)
    orphan = _write_v1(manager.active_dir, "L", 1, 1_000)
    (manager.active_dir / f"{orphan}.pt").unlink()
    with pytest.raises(CheckpointCorruptError, match="has no payload"):
        manager.restore_checkpoint(orphan)
    swapped = _write_v1(manager.active_dir, "L", 2, 1_000)
    torch.save({"layer_id": "other", "seed_id": 2, "state_data": {}}, manager.active_dir / f"{swapped}.pt")
    side = manager.active_dir / f"{swapped}.json"
    body = json.loads(side.read_text())
    body["file_size"] = (manager.active_dir / f"{swapped}.pt").stat().st_size
    side.write_text(json.dumps(body))
    with pytest.raises(CheckpointCorruptError, match="another checkpoint"):
        manager.restore_checkpoint(swapped)
    not_ours = manager.active_dir / "L_3_1000.pt"
    torch.save([1, 2, 3], not_ours)
    (manager.active_dir / "L_3_1000.json").write_text(json.dumps({"checkpoint_id": "L_3_1000", "layer_id": "L", "seed_id": 3}))
    with pytest.raises(CheckpointCorruptError, match="not a Kasmina v1 checkpoint"):
        manager.restore_checkpoint("L_3_1000")
