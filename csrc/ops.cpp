// Operator schemas of the kasmina library. Kernels are registered per backend with
// TORCH_LIBRARY_IMPL in lifecycle_cpu.cpp, blend_cpu.cpp and cuda/*.cu.
#include <Python.h>

#include <string>

#include <torch/library.h>

#include "generated/lifecycle_tables.h"

extern "C" {
// An empty `_C` module: importing it loads this library, whose static initialisers
// register the operators below with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace kasmina {

std::string spec_sha256() { return KASMINA_SPEC_SHA256; }

TORCH_LIBRARY(kasmina, m) {
  m.def("spec_sha256() -> str", &spec_sha256);
  // Lifecycle ops (kasmina/state.py). Every per-seed rule lives in lifecycle_step.h.
  m.def(
      "apply_transitions(Tensor(a!) state, Tensor(b!) history, Tensor(c!) history_count, "
      "Tensor seed_ids, Tensor from_states, Tensor to_states, Tensor context, "
      "Tensor min_epochs, Tensor params) -> Tensor");
  m.def("step_epoch(Tensor(a!) state) -> ()");
  m.def("state_summary(Tensor state) -> Tensor");
  // Chunked blend (kasmina/ops.py): out = base + alpha[chunk] * (blueprint_out - base).
  m.def("chunked_blend(Tensor base, Tensor blueprint_out, Tensor alpha, int num_chunks) -> Tensor");
  m.def(
      "chunked_blend_backward(Tensor grad, Tensor base, Tensor blueprint_out, Tensor alpha, "
      "int num_chunks, bool need_base, bool need_blueprint, bool need_alpha) -> (Tensor, Tensor, Tensor)");
  // The cache size by which CPU blend calls decide to stream their outputs past the cache,
  // and how many calls of this process have streamed (blend_cpu.cpp).
  m.def("blend_stream_cache_bytes() -> int");
  m.def("blend_streamed_calls() -> int");
  // Whether CPU float32/float64 blend calls take the AVX2 row loops (blend_avx2.h).
  m.def("blend_avx2_rows() -> bool");
  // The CPU blend outputs' memory cache (output_cache.h): bytes held, most held, free all.
  m.def("cpu_output_cache_bytes() -> int");
  m.def("cpu_output_cache_limit() -> int");
  m.def("release_cpu_output_cache() -> ()");
  // Per-chunk mean of x and of x * x over a (rows, dim) float32 tensor (telemetry_cpu.cpp).
  m.def("chunk_moments(Tensor values, int num_chunks) -> Tensor");
  // One listing of a checkpoint folder (folder_scan.cpp, kasmina/checkpoint_index.py).
  m.def("scan_folder(str path) -> (Tensor, Tensor, Tensor, int, int)");
}

}  // namespace kasmina
