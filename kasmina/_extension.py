"""Loading the compiled extensions: `kasmina._C` (checked against the spec) and
`kasmina._fileio` (the checkpoint writer's system calls, Linux only)."""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from ._generated.lifecycle_tables import SPEC_SHA256

REBUILD_COMMAND = "pip install --no-build-isolation -e .   (or: make build)"


class StaleExtensionError(ImportError):
    """The compiled extension was built from a different spec than the Python tables."""


def _disabled() -> bool:
    return os.environ.get("KASMINA_DISABLE_EXTENSION", "").strip() not in ("", "0")


def _load() -> tuple[bool, str]:
    if _disabled():
        return False, "KASMINA_DISABLE_EXTENSION is set"
    try:
        from . import _C  # noqa: F401  (importing registers torch.ops.kasmina.*)
    except ImportError as exc:
        return False, f"the compiled extension kasmina._C could not be imported ({exc})"
    compiled = torch.ops.kasmina.spec_sha256()
    if compiled != SPEC_SHA256:
        raise StaleExtensionError(
            f"kasmina._C was built from spec {compiled[:16]}… but the Python tables are from spec "
            f"{SPEC_SHA256[:16]}…; rebuild the extension: {REBUILD_COMMAND}"
        )
    return True, "compiled extension kasmina._C"


def _load_fileio() -> ModuleType | None:
    if _disabled():
        return None
    try:
        from . import _fileio
    except ImportError:
        return None  # not built here (not Linux): kasmina.durable_io makes the same calls in Python
    return _fileio


HAS_EXTENSION, _WHY = _load()
FILEIO = _load_fileio()
HAS_CUDA_KERNELS = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("kasmina::step_epoch", "CUDA")

if not HAS_EXTENSION:
    warnings.warn(f"kasmina: using the pure-torch fallback because {_WHY}", RuntimeWarning, stacklevel=2)


def backend() -> str:
    """Which implementation runs the ops: ``"extension"`` or ``"reference"`` (pure torch)."""
    return "extension" if HAS_EXTENSION else "reference"


def backend_description() -> str:
    """One line saying which backend is in use and why."""
    if not HAS_EXTENSION:
        return f"pure-torch reference ({_WHY})"
    writes = "native checkpoint writes (kasmina._fileio)" if FILEIO is not None else "checkpoint writes in Python"
    return f"{_WHY}, {'with' if HAS_CUDA_KERNELS else 'without'} CUDA kernels, {writes}"
