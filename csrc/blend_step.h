// Chunked blend logic shared by the CPU kernels (blend_cpu.cpp) and the CUDA kernels
// (cuda/blend_cuda.cu). Torch-free, every function KASMINA_HD.
//
// Layout: base, blueprint_out, out and grad are contiguous (rows, dim); alpha has
// num_chunks entries. Chunk s is the contiguous slice [chunk_begin(s), chunk_begin(s + 1))
// of the last dimension; with q = dim / num_chunks and r = dim % num_chunks the first r
// chunks are q + 1 wide, the others q (DESIGN §4). 1 <= num_chunks <= dim.
//
// Formulas, per element of chunk s with a = alpha[s], computed in acc_t (float for
// float32/float16/bfloat16 inputs, double for float64; on CPU also vectors of those), each
// operation rounded on its own (no fused multiply-add), so CPU and CUDA give the same bits:
//   out          = base + a * (blueprint_out - base)        (a != 0)
//   out          = base                                      (a == 0: blueprint_out unread)
//   grad_base    = g * (1 - a)
//   grad_bp      = g * a                                     (a != 0), exactly 0 (a == 0)
//   grad_alpha_s = sum over the chunk and all rows of g * (blueprint_out - base) (a != 0),
//                  exactly 0 (a == 0)
#pragma once

#include <cstdint>

// KASMINA_HD comes from the generated tables, its one definition.
#include "generated/lifecycle_tables.h"

namespace kasmina {
namespace blend {

// First feature of chunk `chunk` (chunk == num_chunks gives dim).
KASMINA_HD int64_t chunk_begin(int64_t chunk, int64_t dim, int64_t num_chunks) {
  const int64_t q = dim / num_chunks;
  const int64_t r = dim % num_chunks;
  return chunk * q + (chunk < r ? chunk : r);
}

// Chunk holding feature `feature` (0 <= feature < dim).
KASMINA_HD int64_t chunk_of(int64_t feature, int64_t dim, int64_t num_chunks) {
  const int64_t q = dim / num_chunks;
  const int64_t r = dim % num_chunks;
  const int64_t wide_end = r * (q + 1);
  return feature < wide_end ? feature / (q + 1) : r + (feature - wide_end) / q;
}

// A chunk whose alpha is exactly zero (either sign) has no blueprint output.
template <typename acc_t>
KASMINA_HD bool chunk_active(acc_t alpha) {
  return alpha != acc_t(0);
}

// Rounded arithmetic: nvcc would otherwise contract a + b * c into one FMA.
KASMINA_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
KASMINA_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
KASMINA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
KASMINA_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
KASMINA_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
KASMINA_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// The formulas from here on are also instantiated on GCC vector types by the CPU kernels'
// AVX2 loops (blend_avx2.h). They are forced inline there, so that no vector is passed
// between code built for AVX2 and code that is not: the two pass vectors differently.
#if defined(__GNUC__) && !defined(__CUDACC__) && !defined(__HIPCC__)
#define KASMINA_BLEND_HD KASMINA_HD __attribute__((always_inline))
#else
#define KASMINA_BLEND_HD KASMINA_HD
#endif

// The rounded operations on those vector types: plain operators, which round each
// operation on its own (the CPU build targets no FMA).
template <typename V>
KASMINA_BLEND_HD V add_rn(V a, V b) {
  return a + b;
}
template <typename V>
KASMINA_BLEND_HD V sub_rn(V a, V b) {
  return a - b;
}
template <typename V>
KASMINA_BLEND_HD V mul_rn(V a, V b) {
  return a * b;
}

// 1 in acc_t: a scalar, or every lane of a vector type (which has no conversion from int).
template <typename acc_t>
KASMINA_BLEND_HD acc_t one() {
  return acc_t{} + 1;
}

// Output of one element of an active chunk.
template <typename acc_t>
KASMINA_BLEND_HD acc_t blend_value(acc_t base, acc_t blueprint, acc_t alpha) {
  return add_rn(base, mul_rn(alpha, sub_rn(blueprint, base)));
}

// d out / d base, times the incoming gradient (any chunk).
template <typename acc_t>
KASMINA_BLEND_HD acc_t grad_base_value(acc_t grad, acc_t alpha) {
  return mul_rn(grad, sub_rn(one<acc_t>(), alpha));
}

// d out / d blueprint_out, times the incoming gradient (active chunks; inactive ones get 0).
template <typename acc_t>
KASMINA_BLEND_HD acc_t grad_blueprint_value(acc_t grad, acc_t alpha) {
  return mul_rn(grad, alpha);
}

// One element's term of grad_alpha (active chunks only).
template <typename acc_t>
KASMINA_BLEND_HD acc_t grad_alpha_term(acc_t grad, acc_t base, acc_t blueprint) {
  return mul_rn(grad, sub_rn(blueprint, base));
}

}  // namespace blend
}  // namespace kasmina
