// Per-thread scratch buffers for the CPU kernels (blend_cpu.cpp, telemetry_cpu.cpp).
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

namespace kasmina {

// Per-thread buffers, reused by every call on the thread and never freed: a call allocates
// nothing on the heap but its outputs. Buffers of a few KB allocated and freed by every
// call landed in the hole the previous call's freed output had left, so each output (64-byte
// aligned: it needs a little more than that hole) came from other memory, cycling through
// four 4 MB blocks where torch.lerp reuses one that is still in the cache. Slot tells
// apart buffers of one type that are alive at once (each kernel file uses its own slots).
template <typename T, int Slot>
inline std::vector<T>& scratch_vector() {
  thread_local std::vector<T> buffer;
  return buffer;
}

// n elements of scratch, 64-byte aligned like tensor memory (vector loads of a buffer
// that is only 16-byte aligned would split cache lines).
template <typename T, int Slot>
inline T* scratch(size_t n) {
  std::vector<T>& buffer = scratch_vector<T, Slot>();
  const size_t pad = 64 / sizeof(T);
  if (buffer.size() < n + pad) buffer.resize(n + pad);
  void* start = buffer.data();
  size_t space = buffer.size() * sizeof(T);
  return static_cast<T*>(std::align(64, n * sizeof(T), start, space));
}

}  // namespace kasmina
