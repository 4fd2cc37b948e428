"""Render every generated file from a spec; write them or check them."""

from __future__ import annotations

from pathlib import Path

from .emit_cpp import emit_cpp
from .emit_docs import emit_docs
from .emit_python import emit_python
from .spec_loader import Spec

PYTHON_TABLES = Path("kasmina/_generated/lifecycle_tables.py")
CPP_HEADER = Path("csrc/generated/lifecycle_tables.h")
DOCS = Path("docs/lifecycle.md")


def _header(spec: Spec) -> str:
    return f"Generated from spec/{spec.path.name} (sha256 {spec.sha256[:16]}) by `python -m codegen`. Do not edit."


def render(spec: Spec) -> dict[Path, str]:
    """Relative path -> file contents, byte-identical for the same spec."""
    header = _header(spec)
    return {
        PYTHON_TABLES: emit_python(spec, header),
        CPP_HEADER: emit_cpp(spec, header),
        DOCS: emit_docs(spec, header),
    }


def write(spec: Spec, root: Path) -> list[Path]:
    written = []
    for rel, text in render(spec).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def check(spec: Spec, root: Path) -> list[Path]:
    """Generated files under ``root`` that are missing or differ from the spec's."""
    stale = []
    for rel, text in render(spec).items():
        path = root / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
    return stale
