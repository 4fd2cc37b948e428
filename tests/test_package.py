"""The package skeleton: states from the generated tables, backend selection, and the
refusal of an extension built from another spec."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kasmina
from kasmina import ExtendedLifecycle
from kasmina._generated import lifecycle_tables as tables

REPO = Path(__file__).resolve().parent.parent


def test_states_follow_the_spec() -> None:
    assert [s.name for s in ExtendedLifecycle] == list(tables.STATE_NAMES)
    assert [int(s) for s in ExtendedLifecycle] == list(range(tables.NUM_STATES))
    for state in ExtendedLifecycle:
        kind = tables.STATE_KINDS[state]
        assert state.kind == kind
        assert state.is_active == (kind == "active")
        assert state.is_terminal == (kind in ("permanent", "retired"))
        assert state.requires_blueprint == tables.STATE_REQUIRES_BLUEPRINT[state]


def test_reference_states_have_reference_meaning() -> None:
    assert ExtendedLifecycle.DORMANT == 0 and ExtendedLifecycle.ROLLED_BACK == 10
    assert not ExtendedLifecycle.DORMANT.is_active and not ExtendedLifecycle.DORMANT.is_terminal
    assert ExtendedLifecycle.TRAINING.is_active and ExtendedLifecycle.TRAINING.learns_from == "reconstruction"
    assert ExtendedLifecycle.FOSSILIZED.is_terminal and ExtendedLifecycle.FOSSILIZED.kind == "permanent"
    assert ExtendedLifecycle.CULLED.kind == "retired" and not ExtendedLifecycle.CULLED.requires_blueprint
    assert ExtendedLifecycle.GRAFTING.alpha_source == "strategy"


def test_backend_reports_extension() -> None:
    assert kasmina.backend() in ("extension", "reference")
    assert kasmina.backend_description()


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_disable_extension_selects_fallback_with_one_warning() -> None:
    result = _python("import kasmina; print(kasmina.backend())", KASMINA_DISABLE_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"
    assert result.stderr.count("pure-torch fallback") == 1


@pytest.mark.skipif(kasmina.backend() != "extension", reason="needs the compiled extension")
def test_stale_extension_is_refused_with_rebuild_command() -> None:
    result = _python(
        """
        import importlib.util, sys, types
        from pathlib import Path
        path = Path("kasmina/_generated/lifecycle_tables.py")
        spec = importlib.util.spec_from_file_location("kasmina._generated.lifecycle_tables", path)
        tables = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tables)
        tables.SPEC_SHA256 = "0" * 64
        package = types.ModuleType("kasmina._generated")
        package.__path__ = [str(path.parent)]
        sys.modules["kasmina._generated"] = package
        sys.modules["kasmina._generated.lifecycle_tables"] = tables
        import kasmina
        """
    )
    assert result.returncode != 0
    assert "StaleExtensionError" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
