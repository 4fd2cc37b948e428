"""Builds the `kasmina._C` torch extension.

KASMINA_CUDA=0 builds the CPU kernels only, KASMINA_CUDA=1 adds the CUDA kernels and
fails without nvcc, KASMINA_CUDA=auto (the default) adds them when torch has CUDA and
nvcc is found.
"""

from __future__ import annotations

import os
from glob import glob

import torch
from setuptools import setup
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
    cxx = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
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


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
