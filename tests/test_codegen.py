"""Code generation: deterministic, faithful to the spec, checkable, and the C++ header
compiles (g++ and nvcc) and behaves as the spec says."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from codegen.generate import CPP_HEADER, DOCS, PYTHON_TABLES, check, render, write
from codegen.spec_loader import DEFAULT_SPEC_PATH, load_spec

REPO = Path(__file__).resolve().parent.parent


def _load_tables(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tables_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mutated(tmp_path: Path, mutate) -> Path:
    """A temp copy of the repo's spec folder with ``mutate`` applied; returns the root."""
    root = tmp_path / "repo"
    shutil.copytree(DEFAULT_SPEC_PATH.parent, root / "spec")
    data = yaml.safe_load((root / "spec" / "lifecycle.yaml").read_text())
    mutate(data)
    (root / "spec" / "lifecycle.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    write(load_spec(root / "spec" / "lifecycle.yaml"), root)
    return root


def test_generation_is_deterministic() -> None:
    spec = load_spec()
    first, second = render(spec), render(load_spec())
    assert first == second
    for text in first.values():
        assert spec.sha256 in text or spec.sha256[:16] in text
        assert "Do not edit" in text.splitlines()[0]


def test_committed_files_are_current() -> None:
    assert check(load_spec(), REPO) == []


def test_check_flags_stale_file_after_spec_edit(tmp_path: Path) -> None:
    root = _mutated(tmp_path, lambda d: None)
    spec_path = root / "spec" / "lifecycle.yaml"
    assert check(load_spec(spec_path), root) == []
    spec_path.write_text(spec_path.read_text() + "\n# a comment changes the hash\n")
    stale = check(load_spec(spec_path), root)
    assert set(stale) == {root / PYTHON_TABLES, root / CPP_HEADER, root / DOCS}


def test_check_flags_changed_line_endings(tmp_path: Path) -> None:
    root = _mutated(tmp_path, lambda d: None)
    spec = load_spec(root / "spec" / "lifecycle.yaml")
    header = root / CPP_HEADER
    header.write_bytes(header.read_bytes().replace(b"\n", b"\r\n"))
    assert check(spec, root) == [header]


def test_cli_check_exit_codes(tmp_path: Path) -> None:
    root = _mutated(tmp_path, lambda d: None)
    spec_path = root / "spec" / "lifecycle.yaml"
    cmd = [sys.executable, "-m", "codegen", "--spec", str(spec_path), "--out", str(root), "--check"]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    (root / CPP_HEADER).write_text("// hand edit\n")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "lifecycle_tables.h" in result.stderr and "python -m codegen" in result.stderr


def test_removed_edge_disappears(tmp_path: Path) -> None:
    def drop(d: dict) -> None:
        d["transitions"] = [t for t in d["transitions"] if not (t["from"] == "TRAINING" and t["to"] == "CULLED")]

    root = _mutated(tmp_path, drop)
    tables = _load_tables(root / PYTHON_TABLES)
    names = tables.STATE_NAMES
    assert tables.EDGE_MATRIX[names.index("TRAINING")][names.index("CULLED")] == -1
    assert tables.NUM_EDGES == 18
    assert "case 30:" not in (root / CPP_HEADER).read_text()  # TRAINING(2) * 11 + CULLED(8)


def test_renamed_state_is_renamed_everywhere(tmp_path: Path) -> None:
    def rename(d: dict) -> None:
        for s in d["states"]:
            if s["name"] == "FOSSILIZED":
                s["name"] = "PETRIFIED"
        for t in d["transitions"]:
            t["to"] = "PETRIFIED" if t["to"] == "FOSSILIZED" else t["to"]

    root = _mutated(tmp_path, rename)
    tables = _load_tables(root / PYTHON_TABLES)
    assert tables.ExtendedLifecycle.PETRIFIED.is_terminal
    assert "FOSSILIZED" not in tables.STATE_NAMES
    assert "PETRIFIED = 7" in (root / CPP_HEADER).read_text()
    assert "PETRIFIED" in (root / DOCS).read_text()


def _compile_probe(root: Path, tmp_path: Path, compiler: list[str]) -> str:
    """Compile a program against the generated header and return what it prints."""
    probe = tmp_path / "probe.cpp"
    probe.write_text(
        """
#include <cmath>
#include <cstdio>
#include "generated/lifecycle_tables.h"
using namespace kasmina::spec;
int main() {
  float params[kNumParams];
  for (int p = 0; p < kNumParams; ++p) params[p] = default_param(p);
  float ctx[kNumContextFields];
  for (int f = 0; f < kNumContextFields; ++f) ctx[f] = NAN;
  int e = edge_id(TRAINING, GRAFTING);
  bool missing = guard_passes(e, ctx, 0.f, 0.f, params);
  ctx[FIELD_RECONSTRUCTION_LOSS] = 0.02f;
  bool at_002 = guard_passes(e, ctx, 0.f, 0.f, params);
  ctx[FIELD_RECONSTRUCTION_LOSS] = params[PARAM_RECONSTRUCTION_THRESHOLD];
  bool at_threshold = guard_passes(e, ctx, 0.f, 0.f, params);
  std::printf("%d %d %d %d %d\\n", default_min_epochs(TRAINING), missing, at_002, at_threshold,
              edge_id(FOSSILIZED, DORMANT));
  return 0;
}
"""
    )
    exe = tmp_path / "probe"
    subprocess.run([*compiler, f"-I{root / 'csrc'}", str(probe), "-o", str(exe)], check=True, capture_output=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_header_compiles_with_gxx_and_follows_spec_edits(tmp_path: Path) -> None:
    gxx = ["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror"]
    assert _compile_probe(REPO, tmp_path, gxx) == ["100", "0", "0", "1", "-1"]

    def edit(d: dict) -> None:
        next(s for s in d["states"] if s["name"] == "TRAINING")["min_epochs"] = 7
        next(p for p in d["params"] if p["name"] == "reconstruction_threshold")["default"] = 0.05

    root = _mutated(tmp_path, edit)
    tables = _load_tables(root / PYTHON_TABLES)
    assert tables.STATE_MIN_EPOCHS[tables.ExtendedLifecycle.TRAINING] == 7
    assert tables.PARAM_DEFAULTS[tables.PARAM_NAMES.index("reconstruction_threshold")] == 0.05
    assert _compile_probe(root, tmp_path, gxx) == ["7", "0", "1", "1", "-1"]


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_header_compiles_with_nvcc(tmp_path: Path) -> None:
    kernel = tmp_path / "probe.cu"
    kernel.write_text(
        """
#include "generated/lifecycle_tables.h"
using namespace kasmina::spec;
__global__ void judge(const float* ctx, const float* params, int* out) {
  out[threadIdx.x] = guard_passes(edge_id(EVALUATING, CULLED), ctx, 0.f, float(threadIdx.x), params)
                     + default_min_epochs(threadIdx.x % kNumStates) + state_alpha_source(threadIdx.x % kNumStates);
}
int main() { return 0; }
"""
    )
    result = subprocess.run(
        [NVCC, "-std=c++17", "-x", "cu", "-arch=sm_90", f"-I{REPO / 'csrc'}", "-c", str(kernel), "-o", str(tmp_path / "probe.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_readme_diagram_is_generated_between_markers(tmp_path: Path) -> None:
    from codegen.generate import README, README_BEGIN, README_END

    root = _mutated(tmp_path, lambda d: None)
    (root / README).write_text(f"intro\n{README_BEGIN}\nold diagram\n{README_END}\noutro\n")
    spec = load_spec(root / "spec" / "lifecycle.yaml")
    assert check(spec, root) == [root / README]
    write(spec, root)
    text = (root / README).read_text()
    assert check(spec, root) == [] and "old diagram" not in text
    assert text.startswith("intro\n") and text.endswith("outro\n") and "TRAINING --> GRAFTING" in text
