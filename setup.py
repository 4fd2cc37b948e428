"""Builds the `kasmina._C` torch extension, and on Linux `kasmina._fileio` (the system
calls and the SHA-256 of a durable checkpoint save, see csrc/fileio/).

KASMINA_CUDA=0 builds the CPU kernels only, KASMINA_CUDA=1 adds the CUDA kernels and
fails without nvcc, KASMINA_CUDA=auto (the default) adds them when torch has CUDA and
nvcc is found.
"""

from __future__ import annotations

import os
import sys
from glob import glob

import torch
from setuptools import Extension, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("KASMINA_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        if CUDA_HOME is None or torch.version.cuda is None:
            raise RuntimeError("KASMINA_CUDA=1 needs a CUDA build of torch and nvcc (set CUDA_HOME)")
        return True
    if mode != "auto":
        raise RuntimeError(f"KASMINA_CUDA={mode!r}: use 0, 1 or auto")
    return CUDA_HOME is not None and torch.version.cuda is not None


def _extension():
    use_cuda = _want_cuda()
    sources = sorted(glob("csrc/*.cpp"))
    # -Wno-psabi: blend_avx2.h instantiates blend_step.h's formulas on AVX vectors, and GCC
    # notes that a call to them would pass those vectors differently without AVX. None is
    # made: they are always_inline (KASMINA_BLEND_HD), which GCC enforces.
    cxx = ["-O3", "-Wno-psabi", "-fopenmp", "-fdiagnostics-color=always"]
    kwargs = dict(
        name="kasmina._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if not use_cuda:
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DKASMINA_WITH_CUDA"]
    extra_include = os.environ.get("KASMINA_CUDA_EXTRA_INCLUDE")
    if extra_include:
        nvcc.append(f"-I{extra_include}")
    return CUDAExtension(
        sources=sources + sorted(glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": [*cxx, "-DKASMINA_WITH_CUDA"], "nvcc": nvcc},
        **kwargs,
    )


def _fileio_extension() -> list[Extension]:
    """The checkpoint writer's native part: its system calls (Linux only: O_TMPFILE, linkat,
    /proc/self/fd; elsewhere kasmina.durable_io does them in Python) and its SHA-256."""
    if not sys.platform.startswith("linux"):
        return []
    # Not the limited API: the buffer protocol joined it only in Python 3.11.
    sources = ["csrc/fileio/durable_commit.cpp", "csrc/fileio/sha256.cpp"]
    return [Extension("kasmina._fileio", sources=sources, extra_compile_args=["-O2", "-Wall"])]


FILEIO = _fileio_extension()
setup(
    ext_modules=[_extension(), *FILEIO],
    cmdclass={"build_ext": BuildExtension},
    # kasmina._C alone is abi3; with kasmina._fileio the wheel is for this Python only
    options={} if FILEIO else {"bdist_wheel": {"py_limited_api": "cp310"}},
)
