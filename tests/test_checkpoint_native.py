"""The native write path (kasmina._fileio) under injected faults: its system calls made to
fail like a real disk's (ENOSPC, EPERM) and inode numbers past 2**63, through an
LD_PRELOAD shim (tests/native/fault_shim.c) compiled here. The Python write path gets the
same faults from monkeypatched os calls in test_checkpoint.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kasmina import checkpoint as ckpt
from kasmina.checkpoint import CheckpointManager

SHIM_SOURCE = Path(__file__).parent / "native" / "fault_shim.c"

pytestmark = pytest.mark.skipif(
    ckpt.FILEIO is None or shutil.which("cc") is None,
    reason="needs kasmina._fileio (Linux, not disabled) and a C compiler for the fault shim",
)

# Runs scenarios one after another in one process (one import of torch): each saves twice
# into its own folder, then once more with the fault armed, and reports what happened.
_DRIVER = """
import json, os, sys, warnings, torch
from kasmina import checkpoint as ckpt, durable_io
assert ckpt.FILEIO is not None
root, armed = sys.argv[1], sys.argv[2]
for name, setting in json.loads(sys.argv[3]).items():
    folder = os.path.join(root, name)
    manager = ckpt.CheckpointManager(folder, max_checkpoints_per_seed=2)
    earlier = [manager.save_checkpoint("L", 0, {"epoch": i, "w": torch.full((256,), i)}) for i in range(2)]
    os.environ.update({f"KASMINA_FAULT_{k}": str(v) for k, v in {**setting, "RUN": name}.items()})
    report = {"earlier": earlier, "error": None, "errno": None, "saved": None}
    open(armed, "w").close()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report["saved"] = manager.save_checkpoint("L", 0, {"epoch": 9, "w": torch.full((256,), 9)})
        report["warnings"] = [str(w.message) for w in caught]
    except ckpt.CheckpointWriteError as exc:
        report["error"], report["errno"] = str(exc), exc.errno
    finally:
        os.unlink(armed)
    report["named_only"] = not durable_io.anonymous_files_possible(manager._active_path)
    report["after"] = manager.save_checkpoint("L", 0, {"epoch": 10, "w": torch.full((256,), 10)})
    report["listed"] = [info.checkpoint_id for info in manager.list_checkpoints()]
    print(json.dumps({name: report}), flush=True)
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    library = tmp_path_factory.mktemp("shim") / "fault_shim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(library), str(SHIM_SOURCE), "-ldl"], check=True)
    return library


def _run(shim: Path, root: Path, scenarios: dict[str, dict], **env: str) -> dict[str, dict]:
    root.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(root), str(root / "armed"), json.dumps(scenarios)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LD_PRELOAD": str(shim), "KASMINA_FAULT_ARMED": str(root / "armed"), "OMP_NUM_THREADS": "1", **env},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    reports: dict[str, dict] = {}
    for line in run.stdout.splitlines():
        reports.update(json.loads(line))
    return reports


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# (call, nth armed call of that kind, the stage the error names)
_DISK_FULL = {
    "payload-write": ("writev", 1, "writing the payload"),
    "sidecar-write": ("writev", 2, "writing the sidecar"),
    "payload-fsync": ("fsync", 1, "syncing the payload and sidecar"),
    "sidecar-fsync": ("fsync", 2, "syncing the payload and sidecar"),
    "payload-link": ("linkat", 1, "publishing the checkpoint"),
    "sidecar-link": ("linkat", 2, "publishing the checkpoint"),
    "folder-fsync": ("fsync", 3, "syncing the folder"),
}


def test_a_full_disk_at_any_call_of_a_native_save_keeps_nothing_of_it(shim: Path, tmp_path: Path) -> None:
    scenarios = {name: {"CALL": call, "NTH": nth, "ERRNO": errno.ENOSPC} for name, (call, nth, _) in _DISK_FULL.items()}
    reports = _run(shim, tmp_path / "runs", scenarios)
    for name, (_, _, stage) in _DISK_FULL.items():
        report, active = reports[name], tmp_path / "runs" / name / "active"
        assert report["saved"] is None and report["errno"] == errno.ENOSPC, name
        assert f"no space left on device while {stage} in {active}" in report["error"], (name, report["error"])
        assert not report["named_only"], name  # a full disk says nothing about unnamed files
        # nothing of the failed save: the two earlier checkpoints, then the next save's (retention kept 2)
        assert report["listed"] == [report["after"], report["earlier"][1]], name
        expected = sorted(f"{i}{ext}" for i in report["listed"] for ext in (".json", ".safetensors"))
        assert _names(active) == expected, name


def test_a_failed_retention_move_warns_and_keeps_the_checkpoint_listed(shim: Path, tmp_path: Path) -> None:
    reports = _run(shim, tmp_path / "runs", {"rename": {"CALL": "rename", "NTH": 1, "ERRNO": errno.EIO}})
    report = reports["rename"]
    assert report["saved"] is not None and report["error"] is None
    assert any(f"retention could not archive {report['earlier'][0]}" in w for w in report["warnings"])
    assert report["listed"] == [report["after"], report["saved"]]  # the next save archived both older ones


def test_a_refused_unnamed_file_fails_that_save_only(shim: Path, tmp_path: Path) -> None:
    """EPERM from open(O_TMPFILE) is an error of that save, as on the Python path, not a
    sign that the folder cannot make unnamed files (that is EOPNOTSUPP, EISDIR, ...)."""
    reports = _run(shim, tmp_path / "runs", {
        "eperm": {"CALL": "open_tmpfile", "NTH": 1, "ERRNO": errno.EPERM},
        "unsupported": {"CALL": "open_tmpfile", "NTH": 1, "ERRNO": errno.EOPNOTSUPP},
    })  # fmt: skip
    eperm, unsupported = reports["eperm"], reports["unsupported"]
    assert eperm["errno"] == errno.EPERM and "while writing the payload" in eperm["error"]
    assert not eperm["named_only"]
    assert unsupported["error"] is None and unsupported["saved"] is not None  # saved with named temp files
    assert unsupported["named_only"]


def test_a_sidecar_that_cannot_be_linked_falls_back_to_a_named_copy(shim: Path, tmp_path: Path) -> None:
    """The payload linked, the sidecar's unnamed file refused (EPERM): the native call
    removes the payload's name and the Python path saves with named temp files, as it
    does when it meets this itself."""
    reports = _run(shim, tmp_path / "runs", {"sidecar-eperm": {"CALL": "linkat", "NTH": 2, "ERRNO": errno.EPERM}})
    report = reports["sidecar-eperm"]
    assert report["error"] is None and report["saved"] is not None and report["named_only"]
    manager = CheckpointManager(tmp_path / "runs" / "sidecar-eperm", max_checkpoints_per_seed=2)
    assert manager.restore_checkpoint(report["saved"])["state_data"]["epoch"] == 9
    assert not [n for n in _names(manager.active_dir) if not n.startswith("L_seed0_")]


def test_inode_numbers_past_2_to_the_63_are_inodes(shim: Path, tmp_path: Path) -> None:
    """Some NFS and FUSE servers hand out 64-bit inode numbers: they are not error codes."""
    reports = _run(shim, tmp_path / "runs", {"high": {"CALL": "none", "NTH": 0, "ERRNO": 0}}, KASMINA_HIGH_INODE="1")
    report = reports["high"]
    assert report["error"] is None and report["listed"] == [report["after"], report["saved"]]
    active = tmp_path / "runs" / "high" / "active"
    assert len(_names(active)) == 4  # two checkpoints, no extra ones from retried ids
