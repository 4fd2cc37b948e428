"""Crash safety and cross-process id uniqueness of CheckpointManager.

One driver subprocess imports kasmina once and forks the writers (cheap), so dozens of
SIGKILLs fit in a few seconds."""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kasmina import checkpoint as kasmina_checkpoint
from kasmina.checkpoint import CheckpointManager, CheckpointRecovery
from kasmina.durable_io import TEMP_PREFIX

KILLS = 32
RACE_WRITERS, RACE_SAVES = 4, 25
VALUES_PER_ROUND = 1_000_000


def use_python_calls() -> None:
    """Make this process (and its forks) save through the Python system calls of
    kasmina.durable_io instead of the native kasmina._fileio."""
    import kasmina.checkpoint as ckpt

    ckpt.FILEIO = None


def use_named_temps() -> None:
    """... and write named temp files, as on systems without ``O_TMPFILE``."""
    import kasmina.durable_io as durable_io

    use_python_calls()
    durable_io._ANONYMOUS_FLAGS = 0


def _save_forever(folder: str, log_path: str, first_value: int, ready_fd: int, in_save: mmap.mmap) -> None:
    """Child: save checkpoints with increasing values, logging each completed one;
    ``in_save[0]`` is 1 while a save works on the folder (its files, links, fsyncs and
    retention moves), 0 while it encodes or the loop logs."""
    manager = CheckpointManager(folder, max_checkpoints_per_seed=3)
    commit = manager._commit

    def flagged_commit(*args: object) -> object:
        in_save[0] = 1
        try:
            return commit(*args)
        finally:
            in_save[0] = 0

    manager._commit = flagged_commit  # type: ignore[method-assign]
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    value = first_value
    while True:
        checkpoint_id = manager.save_checkpoint("L", 0, {"value": value, "t": torch.full((2048,), value, dtype=torch.int64)})
        os.write(log, f"{value} {checkpoint_id}\n".encode())
        if value == first_value:
            os.write(ready_fd, b"r")  # at least one complete save per child
        value += 1


def crash_driver(folder: str, log_path: str, kills: int, seed: int) -> None:
    """Fork a writer ``kills`` times and SIGKILL it at a random moment each time."""
    rng = random.Random(seed)
    in_save = mmap.mmap(-1, 1)  # shared with the forked writers
    for round_ in range(kills):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                _save_forever(folder, log_path, (round_ + 1) * VALUES_PER_ROUND, write_fd, in_save)
            finally:
                os._exit(1)
        os.close(write_fd)
        os.read(read_fd, 1)
        os.close(read_fd)
        time.sleep(rng.uniform(0, 0.025))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with open(f"{log_path}.kills", "a") as kills_log:
            kills_log.write(f"{pid} {in_save[0]}\n")  # 1: the kill landed in a save's work on the folder
        time.sleep(0.002)  # the next writer's ids start in a later millisecond


_IO_CALLS = ("open", "write", "writev", "fsync", "link", "unlink", "replace", "rename")


def _save_until_killed_at(folder: str, log_path: str, point: int) -> None:
    manager = CheckpointManager(folder, max_checkpoints_per_seed=2)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    value = point * VALUES_PER_ROUND
    checkpoint_id = manager.save_checkpoint("L", 0, {"value": value, "t": torch.full((64,), value)})
    os.write(log, f"{value} {checkpoint_id}\n".encode())
    calls = [0]

    def hook(real):
        def hooked(*args, **kwargs):
            calls[0] += 1
            if calls[0] == point:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return hooked

    for name in _IO_CALLS:
        setattr(os, name, hook(getattr(os, name)))
    checkpoint_id = manager.save_checkpoint("L", 0, {"value": value + 1, "t": torch.full((64,), value + 1)})
    os.write(log, f"{value + 1} {checkpoint_id}\n".encode())


def crash_point_driver(folder: str, log_path: str) -> None:
    """Crash a save at every one of its file-system calls in turn: writer ``k`` SIGKILLs
    itself just before the ``k``-th call, until a writer gets through a whole save."""
    for point in range(1, 200):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                _save_until_killed_at(folder, log_path, point)
                code = 0  # reached only when the save ended before call number ``point``
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:  # this point lies past the end of a save
            with open(f"{log_path}.points", "w") as points:
                points.write(str(point - 1))
            return
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        time.sleep(0.002)
    raise AssertionError("a save never completed")


def id_race_driver(folder: str, log_path: str, writers: int, saves: int) -> None:
    """Fork ``writers`` processes that save one seed at once, all stamping the same
    millisecond and starting from the same sequence number, so ids clash constantly."""
    read_fd, write_fd = os.pipe()
    pids = []
    for writer in range(writers):
        pid = os.fork()
        if pid == 0:
            try:
                import kasmina.checkpoint as ckpt

                ckpt.time.time_ns = lambda: 5_000 * 1_000_000
                manager = CheckpointManager(folder, durable=False)
                os.close(write_fd)
                os.read(read_fd, 1)  # start together
                lines = []
                for i in range(saves):
                    checkpoint_id = manager.save_checkpoint("L", 0, {"writer": writer, "i": i}, priority="high")
                    lines.append(f"{writer} {i} {checkpoint_id}\n")
                with open(log_path, "a") as log:
                    log.write("".join(lines))
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(read_fd)
    os.write(write_fd, b"g" * writers)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert status == 0, status


def _every_sidecar_verifies(manager: CheckpointManager) -> None:
    """A sidecar is the commit record: wherever one exists (active/ or archive/), its
    checkpoint must be complete."""
    sidecars = [*manager.active_dir.glob("*.json"), *manager.archive_dir.glob("*.json")]
    assert sidecars
    for sidecar in sidecars:
        manager.verify(sidecar.stem)


# The write paths: the native calls (kasmina._fileio, where built), the Python calls with
# O_TMPFILE temp files, and with named ones (the fallback elsewhere).
WRITE_PATHS = ("native", "anonymous", "named")
# Crash points are found by hooking the Python calls: the Python paths only.
PYTHON_PATHS = ("anonymous", "named")
_PATH_SETUP = {"native": "", "anonymous": "t.use_python_calls(); ", "named": "t.use_named_temps(); "}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """The drivers in one subprocess per write path (one import of torch each):
    {name: (folder, log)}, names ``kill-<path>``, ``points-<path>`` and ``race``."""
    root = tmp_path_factory.mktemp("crash")
    names = [*(f"kill-{path}" for path in WRITE_PATHS), *(f"points-{path}" for path in PYTHON_PATHS), "race"]
    paths = {name: (root / name, root / f"{name}.log") for name in names}
    for folder, log in paths.values():
        CheckpointManager(folder)
        log.touch()
    race_dir, race_log = paths["race"]
    available = [path for path in WRITE_PATHS if path != "native" or kasmina_checkpoint.FILEIO is not None]
    for path in available:
        kill_dir, kill_log = paths[f"kill-{path}"]
        code = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_checkpoint_crash as t; "
            + _PATH_SETUP[path]
            + f"t.crash_driver({str(kill_dir)!r}, {str(kill_log)!r}, {KILLS}, 1234); "
        )
        if path in PYTHON_PATHS:
            points_dir, points_log = paths[f"points-{path}"]
            code += f"t.crash_point_driver({str(points_dir)!r}, {str(points_log)!r}); "
        if path == available[0]:  # the default path
            code += f"t.id_race_driver({str(race_dir)!r}, {str(race_log)!r}, {RACE_WRITERS}, {RACE_SAVES})"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return paths


@pytest.mark.parametrize("path", WRITE_PATHS)
def test_sigkill_at_random_points_never_breaks_a_listed_checkpoint(runs: dict[str, tuple[Path, Path]], path: str) -> None:
    if path == "native" and kasmina_checkpoint.FILEIO is None:
        pytest.skip("kasmina._fileio is not built here (not Linux, or KASMINA_DISABLE_EXTENSION is set)")
    folder, log = runs[f"kill-{path}"]
    completed = [line.split() for line in log.read_text().splitlines()]  # O_APPEND line writes are never torn
    rounds = {int(value) // VALUES_PER_ROUND for value, _ in completed}
    assert len(rounds) == KILLS  # every writer completed a save before it was killed

    interrupted = sum(int(line.split()[1]) for line in Path(f"{log}.kills").read_text().splitlines())
    assert interrupted >= KILLS // 4, f"only {interrupted} of {KILLS} kills landed inside a save"
    leftovers = [p.name for p in (folder / "active").iterdir() if p.name.startswith(TEMP_PREFIX)]
    orphans = [p.stem for p in (folder / "active").glob("*.safetensors") if not p.with_suffix(".json").exists()]
    manager = CheckpointManager(folder)
    assert sorted(p.name for p in manager.cleaned_temp_files) == sorted(leftovers)
    assert not [p for p in (folder / "active").iterdir() if p.name.startswith(TEMP_PREFIX)]

    listed = manager.list_checkpoints(limit=None)
    assert listed
    _every_sidecar_verifies(manager)
    for info in listed:  # every listed checkpoint verifies and holds what was saved
        manager.verify(info.checkpoint_id)
        out = manager.restore_checkpoint(info.checkpoint_id)
        assert torch.equal(out["state_data"]["t"], torch.full((2048,), out["state_data"]["value"], dtype=torch.int64))
    for checkpoint_id in orphans:
        assert checkpoint_id not in {i.checkpoint_id for i in listed}

    last_value, last_id = int(completed[-1][0]), completed[-1][1]
    result = CheckpointRecovery(manager).recover_seed_state("L", 0)
    recovered = result.checkpoint["state_data"]["value"]
    # the last logged save, or the one after it if the kill came between its commit and the log line
    assert recovered in (last_value, last_value + 1)
    assert result.checkpoint_id == last_id or recovered == last_value + 1
    assert all("no sidecar" in s.reason for s in result.skipped)


def test_ids_never_collide_across_processes(runs: dict[str, tuple[Path, Path]]) -> None:
    folder, log = runs["race"]
    rows = [line.split() for line in log.read_text().splitlines()]
    ids = [row[2] for row in rows]
    total = RACE_WRITERS * RACE_SAVES
    assert len(rows) == total and len(set(ids)) == total
    assert len({i.rsplit("_", 2)[1] for i in ids}) == 1  # all in one millisecond
    manager = CheckpointManager(folder)
    assert manager.get_checkpoint_count() == total
    for writer, i, checkpoint_id in rows:
        out = manager.restore_checkpoint(checkpoint_id)
        assert (out["state_data"]["writer"], out["state_data"]["i"]) == (int(writer), int(i))
    assert json.loads((folder / "active" / f"{ids[0]}.json").read_text())["checkpoint_id"] == ids[0]


@pytest.mark.parametrize("path", PYTHON_PATHS)
def test_a_crash_at_every_file_system_call_of_a_save(runs: dict[str, tuple[Path, Path]], path: str) -> None:
    folder, log = runs[f"points-{path}"]
    points = int(Path(f"{log}.points").read_text())
    assert points >= 10  # temp writes, fsyncs, links, unlinks, folder fsync, retention moves
    manager = CheckpointManager(folder)
    assert len(manager.list_checkpoints(limit=None)) >= 2
    _every_sidecar_verifies(manager)
    completed = [line.split() for line in log.read_text().splitlines()]
    last_value = int(completed[-1][0])
    result = CheckpointRecovery(manager).recover_seed_state("L", 0)
    assert result.checkpoint["state_data"]["value"] in (last_value, last_value + 1)
    for checkpoint_id, value in ((i, int(v)) for v, i in completed):  # every completed save survives
        assert manager.restore_checkpoint(checkpoint_id)["state_data"]["value"] == value


# ---- the native path, killed at each of its system calls (strace fault injection) -----------
_NATIVE_SAVE = """
import os, sys, torch
from kasmina import checkpoint as ckpt
assert ckpt.FILEIO is not None
manager = ckpt.CheckpointManager(sys.argv[1], max_checkpoints_per_seed=1, durable=sys.argv[2] == "durable")
data = {"value": 2, "t": torch.full((64,), 2)}
os.getppid()  # marks where the save starts in the trace
manager.save_checkpoint("L", 0, data)
"""
# The calls of a native save that nothing else in that script makes, in the order a
# durable save must make them: both files written, the sidecar's write-back hinted, both
# fsynced, both linked, the folder fsynced, then retention's two renames.
_NATIVE_CALLS = ("writev", "fadvise64", "fsync", "linkat", "rename")
_DURABLE_ORDER = ["writev", "writev", "fadvise64", "fsync", "fsync", "linkat", "linkat", "fsync", "rename", "rename"]


def _strace_usable() -> bool:
    strace = shutil.which("strace")
    return strace is not None and subprocess.run([strace, "-qq", "-e", "trace=none", "true"], capture_output=True).returncode == 0


needs_native_and_strace = pytest.mark.skipif(
    kasmina_checkpoint.FILEIO is None or not _strace_usable(),
    reason="needs kasmina._fileio (Linux, not disabled) and a strace that may trace here",
)


def _one_saved(folder: Path) -> str:
    return CheckpointManager(folder, max_checkpoints_per_seed=1).save_checkpoint("L", 0, {"value": 1, "t": torch.full((64,), 1)})


def _traced_save(folder: Path, durable: bool, *strace_args: str) -> subprocess.CompletedProcess[str]:
    mode = "durable" if durable else "fast"
    command = ["strace", "-f", "-qq", *strace_args, sys.executable, "-c", _NATIVE_SAVE, str(folder), mode]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _calls_of_the_save(log: Path) -> list[str]:
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if " getppid(" in line)
    return [line.split()[1].split("(")[0] for line in lines[start + 1 :] if "(" in line]


@needs_native_and_strace
@pytest.mark.parametrize("durable", [True, False])
def test_native_save_makes_its_calls_in_the_safe_order(tmp_path: Path, durable: bool) -> None:
    folder, log = tmp_path / "ckpt", tmp_path / "trace"
    _one_saved(folder)
    run = _traced_save(folder, durable, "-o", str(log), "-e", f"trace=getppid,{','.join(_NATIVE_CALLS)}")
    assert run.returncode == 0, run.stderr
    expected = _DURABLE_ORDER if durable else [call for call in _DURABLE_ORDER if call not in ("fadvise64", "fsync")]
    assert _calls_of_the_save(log) == expected


@needs_native_and_strace
def test_native_save_killed_at_each_system_call_keeps_every_complete_checkpoint(tmp_path: Path) -> None:
    """SIGKILL on entry to each call of a durable native save (the call never runs): the
    earlier checkpoint survives, whatever is listed verifies, no temp file is left, and
    recovery returns the earlier save, or the new one once its sidecar is linked (then
    complete: a SIGKILL loses no page cache, only a power loss needs the folder fsync)."""
    template = tmp_path / "template"
    first = _one_saved(template)
    for point, call in enumerate(_DURABLE_ORDER):
        nth = _DURABLE_ORDER[: point + 1].count(call)
        folder = tmp_path / f"kill-{point}"
        shutil.copytree(template, folder)
        run = _traced_save(folder, True, "-o", "/dev/null", "-e", f"trace={call}", "-e", f"inject={call}:signal=KILL:when={nth}")
        assert run.returncode == -signal.SIGKILL, (call, nth, run.returncode, run.stderr)
        manager = CheckpointManager(folder, max_checkpoints_per_seed=1)
        assert not [p for p in (folder / "active").iterdir() if p.name.startswith(TEMP_PREFIX)]
        _every_sidecar_verifies(manager)
        assert manager.restore_checkpoint(first)["state_data"]["value"] == 1  # in active/ or archive/
        result = CheckpointRecovery(manager).recover_seed_state("L", 0)
        committed = point > _DURABLE_ORDER.index("linkat") + 1  # killed after the sidecar's link: complete
        assert result.checkpoint["state_data"]["value"] == (2 if committed else 1), (call, nth)
        listed = [info.checkpoint_id for info in manager.list_checkpoints(limit=None)]
        assert listed[0] == result.checkpoint_id and set(listed[1:]) <= {first}  # retention may not have run yet
