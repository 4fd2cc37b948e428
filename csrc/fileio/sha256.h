// kasmina._fileio.sha256_hex (sha256.cpp), registered by durable_commit.cpp.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

// sha256_hex(chunks: tuple of buffers, portable: bool = False) -> str (64 hex digits)
PyObject* kasmina_sha256_hex(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

// Whether sha256_hex uses the CPU's SHA extensions here (the module's SHA_NI).
bool kasmina_sha256_uses_sha_ni();
