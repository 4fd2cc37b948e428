// AVX2 row loops of the CPU chunked blend (float32 and float64), used by blend_cpu.cpp
// when the machine has AVX2. The formulas are blend_step.h's, evaluated on GCC vector
// types; AVX2 without FMA, so they round as the scalar loops and the CUDA kernels do.
//
// A row is walked in blocks of one vector. Each block's weights say whether all, none or
// some of its features are active: all -> plain loads of blueprint_out; none -> no load of
// it; some (a chunk boundary inside the block) -> masked loads that read only the active
// lanes. Stores are non-temporal when the call streams (see streams_outputs): written
// straight from the registers, aligned blocks only, the unaligned head and tail of a row
// elementwise.
//
// Measured here (AMD EPYC under KVM, 4096x1024 float32, one thread, non-temporal stores):
// - masked loads cost about a third more than plain ones even with every lane active
//   (3.6-5.3 ms against 2.6-3.9 ms), so they are kept to the blocks that need them;
// - skipping blueprint_out in the inactive blocks of a row that also has active ones was
//   slower than reading all of it (every other chunk at alpha == 0: 3.7-3.9 ms with 64-feature
//   chunks, 3.8-4.5 ms with 512, against 2.6-3.0 ms for a dense row), because each gap
//   restarts the hardware prefetcher's stream. A prefetch hint on the skipped lines keeps the
//   stream going (2.6-3.2 ms, 2.4-2.5 ms with 7 of 8 chunks at alpha == 0) without reading a
//   value: a hint cannot fault and its line is never used. Rows with no active chunk at all
//   get no hints (1.8-2.2 ms against 2.3-2.7 ms with them).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KASMINA_HAS_AVX2_ROWS 1

#include <immintrin.h>

#include <cstdint>

#include "blend_step.h"

namespace kasmina {
namespace blend {
namespace avx2 {

#define KASMINA_AVX2 __attribute__((target("avx2")))
#define KASMINA_AVX2_INLINE __attribute__((target("avx2"), always_inline)) inline

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef decltype(V{} != V{}) M;  // what comparing two V gives
  static constexpr int64_t kLanes = 8;
  static constexpr int kAll = 0xFF;
  KASMINA_AVX2_INLINE static V load(const float* p) { return reinterpret_cast<V>(_mm256_loadu_ps(p)); }
  KASMINA_AVX2_INLINE static V load_active(const float* p, M active) {
    return reinterpret_cast<V>(_mm256_maskload_ps(p, reinterpret_cast<__m256i>(active)));
  }
  KASMINA_AVX2_INLINE static int bits(M active) { return _mm256_movemask_ps(reinterpret_cast<__m256>(active)); }
  KASMINA_AVX2_INLINE static void store(float* p, V v) { _mm256_storeu_ps(p, reinterpret_cast<__m256>(v)); }
  KASMINA_AVX2_INLINE static void stream(float* p, V v) { _mm256_stream_ps(p, reinterpret_cast<__m256>(v)); }
};

template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef decltype(V{} != V{}) M;
  static constexpr int64_t kLanes = 4;
  static constexpr int kAll = 0xF;
  KASMINA_AVX2_INLINE static V load(const double* p) { return reinterpret_cast<V>(_mm256_loadu_pd(p)); }
  KASMINA_AVX2_INLINE static V load_active(const double* p, M active) {
    return reinterpret_cast<V>(_mm256_maskload_pd(p, reinterpret_cast<__m256i>(active)));
  }
  KASMINA_AVX2_INLINE static int bits(M active) { return _mm256_movemask_pd(reinterpret_cast<__m256d>(active)); }
  KASMINA_AVX2_INLINE static void store(double* p, V v) { _mm256_storeu_pd(p, reinterpret_cast<__m256d>(v)); }
  KASMINA_AVX2_INLINE static void stream(double* p, V v) { _mm256_stream_pd(p, reinterpret_cast<__m256d>(v)); }
};

// A store of v at p, non-temporal with kStream (p then 32-byte aligned).
template <bool kStream, typename T>
KASMINA_AVX2_INLINE void put(T* p, typename Vec<T>::V v) {
  if constexpr (kStream) {
    Vec<T>::stream(p, v);
  } else {
    Vec<T>::store(p, v);
  }
}

// Elements before `p` is kAlign-byte aligned, at most n (non-temporal vector stores need
// 32; whole lines need 64).
template <typename T, int64_t kAlign = 32>
int64_t unaligned_head(const T* p, int64_t n) {
  const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % kAlign);
  const int64_t head = misaligned == 0 ? 0 : (kAlign - misaligned) / static_cast<int64_t>(sizeof(T));
  return head < n ? head : n;
}

// Hint that keeps the hardware prefetcher's stream through a block whose blueprint_out is
// not read (see the top of this file).
KASMINA_AVX2_INLINE void keep_stream(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_NTA); }

// One row of the forward pass: out = blend_value where the weight is active, base elsewhere.
// `hint` asks for keep_stream on the blocks with no active feature. kAllActive: every
// weight is non-zero (no block needs checking).
template <typename T, bool kStream, bool kAllActive>
KASMINA_AVX2 __attribute__((noinline)) void forward_row(T* __restrict__ out, const T* __restrict__ base,
                                                        const T* __restrict__ bp, const T* __restrict__ weight,
                                                        int64_t n, bool hint) {
  using X = Vec<T>;
  using V = typename X::V;
  const auto element = [&](int64_t i) {
    const T w = weight[i];
    out[i] = chunk_active(w) ? blend_value<T>(base[i], bp[i], w) : base[i];
  };
  int64_t i = 0;
  if constexpr (kStream) {
    for (const int64_t head = unaligned_head(out, n); i < head; ++i) element(i);
  }
  for (; i + X::kLanes <= n; i += X::kLanes) {
    const V w = X::load(weight + i);
    const V b = X::load(base + i);
    const auto active = w != V{};
    const int bits = kAllActive ? X::kAll : X::bits(active);
    V v;
    if (bits == X::kAll) {
      v = blend_value<V>(b, X::load(bp + i), w);
    } else if (bits == 0) {
      if (hint) keep_stream(bp + i);
      v = b;
    } else {
      v = active ? blend_value<V>(b, X::load_active(bp + i, active), w) : b;
    }
    put<kStream>(out + i, v);
  }
  for (; i < n; ++i) element(i);
}

// One vector of the backward pass at feature i: the grad_base and grad_blueprint_out values
// in to_gb and to_gp, the grad_alpha terms added to colsum (NA). Inactive features get
// grad_base = g, grad_blueprint_out = 0 and no grad_alpha term (their colsum entries are
// never folded, and may hold anything).
template <typename T, bool NB, bool NP, bool NA, bool kAllActive>
KASMINA_AVX2_INLINE void backward_vector(const T* __restrict__ g, const T* __restrict__ base,
                                         const T* __restrict__ bp, const T* __restrict__ weight,
                                         T* __restrict__ colsum, int64_t i, bool hint, typename Vec<T>::V& to_gb,
                                         typename Vec<T>::V& to_gp) {
  using X = Vec<T>;
  using V = typename X::V;
  const V w = X::load(weight + i);
  const V gv = X::load(g + i);
  const auto active = w != V{};
  const int bits = kAllActive ? X::kAll : X::bits(active);
  if (bits == X::kAll) {
    if constexpr (NB) to_gb = grad_base_value<V>(gv, w);
    if constexpr (NP) to_gp = grad_blueprint_value<V>(gv, w);
    if constexpr (NA) X::store(colsum + i, X::load(colsum + i) + grad_alpha_term<V>(gv, X::load(base + i), X::load(bp + i)));
  } else if (bits == 0) {
    to_gb = gv;
    to_gp = V{};
    if constexpr (NA) {
      if (hint) keep_stream(bp + i);
    }
  } else {
    if constexpr (NB) to_gb = active ? grad_base_value<V>(gv, w) : gv;
    if constexpr (NP) to_gp = active ? grad_blueprint_value<V>(gv, w) : V{};
    if constexpr (NA) {
      const V term = grad_alpha_term<V>(gv, X::load(base + i), X::load_active(bp + i, active));
      X::store(colsum + i, X::load(colsum + i) + term);
    }
  }
}

// One row of the backward pass, for the outputs NB (grad_base), NP (grad_blueprint_out)
// and NA (grad_alpha terms added to colsum, per feature); see backward_vector. `hint` as in
// forward_row. With kStream, each step writes a whole 64-byte line of each output before
// the next (two streams written 32 bytes at a time in turn were 3-4 times slower here), and
// gb and gp must share their alignment.
template <typename T, bool NB, bool NP, bool NA, bool kStream, bool kAllActive>
KASMINA_AVX2 __attribute__((noinline)) void backward_row(const T* __restrict__ g, const T* __restrict__ base,
                                                         const T* __restrict__ bp, T* __restrict__ gb,
                                                         T* __restrict__ gp, const T* __restrict__ weight,
                                                         T* __restrict__ colsum, int64_t n, bool hint) {
  using X = Vec<T>;
  using V = typename X::V;
  constexpr int64_t kVectors = kStream ? 64 / sizeof(V) : 1;
  constexpr int64_t kStep = kVectors * X::kLanes;
  const auto element = [&](int64_t i) {
    const T gv = g[i];
    const T w = weight[i];
    const bool active = chunk_active(w);
    if constexpr (NB) gb[i] = active ? grad_base_value<T>(gv, w) : gv;
    if constexpr (NP) gp[i] = active ? grad_blueprint_value<T>(gv, w) : T(0);
    if constexpr (NA) {
      if (active) colsum[i] += grad_alpha_term<T>(gv, base[i], bp[i]);
    }
  };
  int64_t i = 0;
  if constexpr (kStream) {
    for (const int64_t head = unaligned_head<T, 64>(NB ? gb : gp, n); i < head; ++i) element(i);
  }
  for (; i + kStep <= n; i += kStep) {
    V to_gb[kVectors], to_gp[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) {
      backward_vector<T, NB, NP, NA, kAllActive>(g, base, bp, weight, colsum, i + v * X::kLanes, hint, to_gb[v],
                                                  to_gp[v]);
    }
    if constexpr (NB) {
      for (int64_t v = 0; v < kVectors; ++v) put<kStream>(gb + i + v * X::kLanes, to_gb[v]);
    }
    if constexpr (NP) {
      for (int64_t v = 0; v < kVectors; ++v) put<kStream>(gp + i + v * X::kLanes, to_gp[v]);
    }
  }
  for (; i < n; ++i) element(i);
}

#undef KASMINA_AVX2_INLINE
#undef KASMINA_AVX2

}  // namespace avx2
}  // namespace blend
}  // namespace kasmina

#endif
