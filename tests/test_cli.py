"""The `kasmina` CLI: every subcommand, its --help, exit codes and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kasmina import SPEC_SHA256, __version__
from kasmina.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0] and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["demo"],
        ["spec"],
        ["spec", "validate"],
        ["spec", "diagram"],
        ["ckpt"],
        ["ckpt", "ls"],
        ["ckpt", "verify"],
        ["ckpt", "migrate"],
        ["bench"],
        ["info"],
    ],
)
def test_help_everywhere(capsys, argv):
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0
    assert out.startswith("usage: kasmina")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["spec"], "required: ACTION"),
        (["spec", "diagram", "--format", "svg"], "invalid choice: 'svg'"),
        (["demo", "--epochs", "0"], "expected a positive integer, got 0"),
        (["demo", "--epochs", "many"], "expected a positive integer, got 'many'"),
        (["demo", "--seeds", "-3"], "expected a positive integer, got -3"),
        (["demo", "--seed", "x"], "expected an integer, got 'x'"),
        (["ckpt", "ls"], "required: dir"),
        (["ckpt", "ls", "d", "--limit", "0"], "positive integer"),
        (["info", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, fragment)


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"kasmina {__version__}" in out
    assert SPEC_SHA256 in out
    assert "backend:" in out and "CUDA kernels:" in out
    code, out, _ = run(capsys, "info", "--json")
    data = json.loads(out)
    assert data["version"] == __version__
    assert data["spec_sha256"] == SPEC_SHA256
    assert data["backend"] in ("extension", "reference")
    assert data["cuda_available"] == torch.cuda.is_available()
    if data["backend"] == "extension":
        assert data["blend_stream_cache_bytes"] == torch.ops.kasmina.blend_stream_cache_bytes() > 0
        assert data["cpu_output_cache_limit"] == torch.ops.kasmina.cpu_output_cache_limit() >= 0
        assert data["blend_avx2_rows"] == torch.ops.kasmina.blend_avx2_rows()


def test_spec_validate_default_and_file(capsys):
    code, out, _ = run(capsys, "spec", "validate")
    assert code == 0 and "valid (11 states" in out and SPEC_SHA256[:16] in out
    code, out, _ = run(capsys, "spec", "validate", str(ROOT / "spec" / "lifecycle.yaml"))
    assert code == 0 and "valid" in out


def test_spec_validate_prints_every_error(capsys, tmp_path):
    text = (ROOT / "spec" / "lifecycle.yaml").read_text()
    bad = text.replace("{from: DORMANT, to: GERMINATED}", "{from: DORMANT, to: GERMINATD}").replace(
        "{from: CULLED, to: DORMANT}", "{from: CULLED, to: DORMNT}"
    )
    assert bad != text
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    code, _, err = run(capsys, "spec", "validate", str(path))
    assert code == 1
    assert "GERMINATD" in err and "DORMNT" in err
    assert "Traceback" not in err
    path.write_text("states: [unclosed")
    code, _, err = run(capsys, "spec", "validate", str(path))
    assert code == 1 and "not valid YAML" in err


def test_spec_validate_missing_file_is_a_user_error(capsys, tmp_path):
    code, _, err = run(capsys, "spec", "validate", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert_one_line_error(err, "does not exist")


def test_spec_diagram_formats(capsys):
    code, out, _ = run(capsys, "spec", "diagram")
    assert code == 0 and out.startswith("stateDiagram-v2") and "DORMANT --> GERMINATED" in out
    code, out, _ = run(capsys, "spec", "diagram", "--format", "dot")
    assert code == 0 and out.startswith("digraph lifecycle") and "DORMANT -> GERMINATED" in out


def test_bench_passes_options_and_maps_exit_codes(capsys, monkeypatch, tmp_path):
    calls = []

    def fake_run(command, cwd, check):
        calls.append((command, cwd))
        return subprocess.CompletedProcess(command, returncode=fake_run.code)

    monkeypatch.setattr(subprocess, "run", fake_run)
    fake_run.code = 0
    code, out, _ = run(capsys, "bench", "--quick", "--out", str(tmp_path))
    assert code == 0 and "BENCHMARKS.md" in out
    command, cwd = calls[-1]
    assert command[:3] == [sys.executable, "-m", "benchmarks"]
    assert "--quick" in command and str(tmp_path.resolve()) in command
    assert Path(cwd) == ROOT
    fake_run.code = 3
    code, _, err = run(capsys, "bench")
    assert code == 1 and "exit code 3" in err
    assert "--quick" not in calls[-1][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of --device cuda on a machine without CUDA")
def test_bench_refuses_cuda_without_a_device(capsys, tmp_path):
    code, _, _ = run(capsys, "bench", "--device", "cuda", "--out", str(tmp_path))
    assert code == 2


def test_ckpt_on_a_missing_or_foreign_folder_is_a_user_error(capsys, tmp_path):
    for action in ("ls", "verify", "migrate"):
        code, _, err = run(capsys, "ckpt", action, str(tmp_path / "nope"))
        assert code == 2
        assert_one_line_error(err, "does not exist")
        code, _, err = run(capsys, "ckpt", action, str(tmp_path))
        assert code == 2
        assert_one_line_error(err, "no active/ subfolder")


def test_console_script_subprocess_smoke():
    exe = Path(sys.executable).parent / "kasmina"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "kasmina.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([*command, "info"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert SPEC_SHA256 in out.stdout
    bad = subprocess.run([*command, "spec", "diagram", "--format", "png"], capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "invalid choice: 'png'")


def _v1_checkpoint(folder: Path, layer: str, seed: int, ms: int) -> str:
    """A v1 checkpoint as the original implementation wrote it (REFERENCE part A)."""
    checkpoint_id = f"{layer}_{seed}_{ms}"
    data = {
        "version": 1,
        "checkpoint_id": checkpoint_id,
        "layer_id": layer,
        "seed_id": seed,
        "timestamp": ms / 1000,
        "priority": "normal",
        "state_data": {"state": 2, "epochs": torch.tensor([3], dtype=torch.int32)},
        "blueprint_state": {"weight": torch.ones(2, 2)},
        "metadata": {},
    }
    torch.save(data, folder / f"{checkpoint_id}.pt")
    side = {
        "checkpoint_id": checkpoint_id,
        "layer_id": layer,
        "seed_id": seed,
        "timestamp": ms / 1000,
        "priority": "normal",
        "lifecycle_state": 2,
        "file_size": (folder / f"{checkpoint_id}.pt").stat().st_size,
    }
    (folder / f"{checkpoint_id}.json").write_text(json.dumps(side))
    return checkpoint_id


def test_ckpt_ls_verify_and_migrate(capsys, tmp_path):
    from kasmina.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, durable=False)
    good = manager.save_checkpoint("enc", 0, {"lifecycle_state": 2, "x": torch.arange(4)})
    bad = manager.save_checkpoint("enc", 1, {"lifecycle_state": 3, "x": torch.arange(4)})
    v1 = _v1_checkpoint(tmp_path / "active", "enc", 2, 1706115234567)

    code, out, _ = run(capsys, "ckpt", "ls", str(tmp_path))
    assert code == 0
    rows = out.strip().splitlines()
    assert rows[0].split("\t")[0] == "checkpoint_id" and len(rows) == 4
    assert {r.split("\t")[0] for r in rows[1:]} == {good, bad, v1}
    code, out, _ = run(capsys, "ckpt", "ls", str(tmp_path), "--seed-id", "0", "--layer", "enc")
    assert code == 0 and len(out.strip().splitlines()) == 2 and good in out

    code, out, err = run(capsys, "ckpt", "verify", str(tmp_path))
    assert code == 0 and "3 ok, 0 failed" in err
    payload = tmp_path / "active" / f"{bad}.safetensors"
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x01
    payload.write_bytes(bytes(data))
    code, out, err = run(capsys, "ckpt", "verify", str(tmp_path))
    assert code == 1 and f"FAIL {bad}" in out and f"ok   {good}" in out and "2 ok, 1 failed" in err
    code, out, _ = run(capsys, "ckpt", "verify", str(tmp_path), good)
    assert code == 0 and out.strip() == f"ok   {good}"

    code, out, err = run(capsys, "ckpt", "migrate", str(tmp_path))
    assert code == 0 and f"migrated {v1}.pt -> {v1}" in out and "1 migrated, 0 failed" in err
    assert (tmp_path / "active" / f"{v1}.safetensors").exists() and (tmp_path / "active" / f"{v1}.pt.bak").exists()
    restored = CheckpointManager(tmp_path).restore_checkpoint(v1)
    assert restored["source_version"] == 2 and torch.equal(restored["blueprint_state"]["weight"], torch.ones(2, 2))
    code, _, err = run(capsys, "ckpt", "migrate", str(tmp_path))
    assert code == 0 and "0 migrated, 0 failed" in err
