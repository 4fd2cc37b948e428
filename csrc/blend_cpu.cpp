// CPU kernels of kasmina::chunked_blend and kasmina::chunked_blend_backward. The
// per-element formulas and the chunk layout are in blend_step.h; this file walks the
// contiguous (rows, dim) inputs with at::parallel_for.
//
// Alpha is expanded once per call into a per-feature weight, and the last dimension
// into maximal runs of features whose chunks are all active (alpha != 0) or all
// inactive. float32 and float64 on machines with AVX2 take one row loop per row of a tile
// (blend_avx2.h), which never reads blueprint_out in an inactive chunk. Elsewhere an active
// run is one vectorisable loop however narrow its chunks are, and an inactive run is a copy
// (grad_base: of grad) or a zero fill. Calls larger than the last-level cache, and calls
// whose output memory has likely left it, write their outputs with non-temporal stores
// (streams_outputs; outside the row loops only in runs of 1 KB or more, streams_run).
//
// Work is cut into tiles of about kTileElements elements (a block of rows times a block
// of features; kSumTileElements when grad_alpha is summed, so that folding a tile's
// column sums stays cheap next to the tile, and at most kSumTileColumnBytes of column
// sums wide), and the tiles into tasks. Tiles and tasks follow from the shape alone,
// never from the thread count. For grad_alpha each tile sums its rows per feature in
// acc_t, then folds those column sums into its task's per-chunk partial sums (float64);
// the tasks' partials are added in task order at the end, so the result depends neither
// on thread scheduling nor on at::get_num_threads().
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KASMINA_HAS_F16C_PATH 1
#endif

#include "blend_args.h"
#include "blend_avx2.h"
#include "blend_step.h"
#include "cpu_loop.h"
#include "env_settings.h"
#include "output_cache.h"
#include "scratch.h"

namespace kasmina {
namespace blend {
namespace {

// The run loops stay out of line: inlined into the tile lambdas they lose their
// __restrict__ guarantees, and GCC then reloads every pointer from the stack per vector.

constexpr int64_t kTileElements = 1 << 15;
constexpr int64_t kSumTileElements = 1 << 17;
constexpr int64_t kMaxTileColumns = 1 << 13;  // when rows are too few to share out
// The column sums of a tile that sums grad_alpha stay in L1: a 64x16384 float32 backward
// took 0.76 ms with tiles 4096 features wide against 0.86 ms with whole rows here (its
// grad_alpha alone 0.33 against 0.43).
constexpr int64_t kSumTileColumnBytes = 16 << 10;
constexpr int64_t kWholeRowsMinRows = 32;     // fewer rows than this: tiles split the features too
constexpr int64_t kMaxTasks = 256;            // enough to share out among the threads of large machines
constexpr int64_t kMaxPartials = int64_t{1} << 22;  // bound on tasks x chunks partial sums (32 MB of float64)

// A maximal range [begin, end) of features whose chunks are all active or all inactive.
struct Run {
  int64_t begin;
  int64_t end;
  bool active;
};

// Per-call layout: feature weights, runs, chunk boundaries and the tiling (in scratch).
template <typename acc_t>
struct Layout {
  int64_t rows, dim, num_chunks;
  acc_t* weight;                 // alpha of each feature's chunk
  int64_t* begins;               // chunk s is [begins[s], begins[s + 1])
  std::vector<Run>& runs;
  int64_t tile_rows, tile_cols, row_tiles, col_tiles, num_tasks;

  Layout(const acc_t* alpha, int64_t rows_, int64_t dim_, int64_t num_chunks_, int64_t tile_elements,
         int64_t max_tasks = kMaxTasks, int64_t max_tile_cols = std::numeric_limits<int64_t>::max())
      : rows(rows_), dim(dim_), num_chunks(num_chunks_), weight(scratch<acc_t, 0>(static_cast<size_t>(dim_))),
        begins(scratch<int64_t, 1>(static_cast<size_t>(num_chunks_ + 1))), runs(scratch_vector<Run, 2>()) {
    runs.clear();
    for (int64_t s = 0; s <= num_chunks; ++s) begins[s] = chunk_begin(s, dim, num_chunks);
    for (int64_t s = 0; s < num_chunks; ++s) {
      std::fill(weight + begins[s], weight + begins[s + 1], alpha[s]);
      const bool active = chunk_active(alpha[s]);
      if (!runs.empty() && runs.back().active == active) {
        runs.back().end = begins[s + 1];
      } else {
        runs.push_back({begins[s], begins[s + 1], active});
      }
    }
    // Whole rows keep every stream sequential; rows are split only when there are too
    // few of them to share out, or to keep a tile within max_tile_cols.
    tile_cols = std::min({dim, max_tile_cols, rows >= kWholeRowsMinRows ? dim : kMaxTileColumns});
    tile_rows = std::max<int64_t>(1, tile_elements / tile_cols);
    row_tiles = (rows + tile_rows - 1) / tile_rows;
    col_tiles = (dim + tile_cols - 1) / tile_cols;
    num_tasks = std::max<int64_t>(1, std::min(row_tiles * col_tiles, max_tasks));
  }

  // Runs body(row_begin, row_end, col_begin, col_end, task) for every tile, tasks in parallel.
  template <typename Body>
  void for_each_tile(const Body& body) const {
    const int64_t tiles = row_tiles * col_tiles;
    at::parallel_for(0, num_tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        for (int64_t t = tiles * task / num_tasks; t < tiles * (task + 1) / num_tasks; ++t) {
          const int64_t r0 = (t / col_tiles) * tile_rows;
          const int64_t c0 = (t % col_tiles) * tile_cols;
          body(r0, std::min(rows, r0 + tile_rows), c0, std::min(dim, c0 + tile_cols), task);
        }
      }
    });
  }

  // Whether every chunk is active, and whether the rows hold active and inactive chunks.
  bool all_active() const { return runs.size() == 1 && runs[0].active; }
  bool mixed() const { return runs.size() > 1; }

  // Calls f(lo, hi, active) for the parts of the runs inside [c0, c1).
  template <typename F>
  void for_each_run(int64_t c0, int64_t c1, const F& f) const {
    for (const Run& run : runs) {
      if (run.end <= c0) continue;
      if (run.begin >= c1) break;
      f(std::max(run.begin, c0), std::min(run.end, c1), run.active);
    }
  }
};

// Copy and zero fill of a run. Explicit 16-byte moves: glibc's memcpy/memset take
// `rep movsb`/`rep stosb` for mid-sized blocks, which is several times slower than
// vector moves on some machines (AMD Zen under KVM here). With `stream`, the stores are
// non-temporal (see streams_outputs); the caller ends its task with stream_fence().
#if defined(__SSE2__)
inline void store16(unsigned char* d, __m128i v, bool stream) {
  if (stream) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), v);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), v);
  }
}

// Bytes to write one at a time before `d` is 16-byte aligned (non-temporal stores need it).
inline size_t head_bytes(const void* d, size_t bytes) {
  return std::min(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
}
#endif

KASMINA_NOINLINE void copy_bytes(void* __restrict__ dst, const void* __restrict__ src, size_t bytes,
                                 bool stream = false) {
#if defined(__SSE2__)
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  size_t i = head_bytes(d, bytes);
  std::memcpy(d, s, i);
  for (; i + 64 <= bytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    store16(d + i, a, stream);
    store16(d + i + 16, b, stream);
    store16(d + i + 32, c, stream);
    store16(d + i + 48, e, stream);
  }
  for (; i + 16 <= bytes; i += 16) store16(d + i, _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)), stream);
  std::memcpy(d + i, s + i, bytes - i);
#else
  (void)stream;
  std::memcpy(dst, src, bytes);
#endif
}

KASMINA_NOINLINE void zero_bytes(void* dst, size_t bytes, bool stream = false) {
#if defined(__SSE2__)
  auto* d = static_cast<unsigned char*>(dst);
  const __m128i zero = _mm_setzero_si128();
  size_t i = head_bytes(d, bytes);
  std::memset(d, 0, i);
  for (; i + 16 <= bytes; i += 16) store16(d + i, zero, stream);
  std::memset(d + i, 0, bytes - i);
#else
  (void)stream;
  std::memset(dst, 0, bytes);
#endif
}

// Makes a task's non-temporal stores visible before the parallel region ends.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Size of the last-level cache (Linux sysfs; 32 MiB where it cannot be read).
int64_t last_level_cache_bytes() {
  std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index3/size");  // e.g. "32768K"
  int64_t kib = 0;
  return (file >> kib) && kib > 0 ? kib * 1024 : int64_t{32} << 20;
}

// The cache size streams_outputs judges by: the last-level cache's, or KASMINA_STREAM_MIN_BYTES.
int64_t stream_cache_bytes() {
  static const int64_t bytes = env_byte_count("KASMINA_STREAM_MIN_BYTES", last_level_cache_bytes());
  return bytes;
}

// Runs narrower than this keep cached stores even in a call that streams: non-temporal
// stores in short pieces between cached loads were slower here (4096x1024 with every other
// chunk at alpha == 0, runs of 256 bytes: 0.55-0.72 of the memory-traffic bound streamed,
// 0.61-0.84 cached, medians 0.59 and 0.72 over 8 and 12 runs; measured before the AVX2 row
// loops, which now take float32 and float64 on such machines).
constexpr size_t kShortRunBytes = 1024;

bool streams_run(bool stream, size_t bytes) { return stream && bytes >= kShortRunBytes; }

// Calls of this process for which streams_outputs chose non-temporal stores
// (blend_streamed_calls, for tests and diagnosis).
std::atomic<int64_t> streamed_calls{0};

int64_t blend_streamed_calls() { return streamed_calls.load(std::memory_order_relaxed); }

// Whether a call moving `bytes`, whose outputs' memory was last written by these kernels
// `since_written` bytes of their traffic ago (output_cache.h), writes its outputs with
// non-temporal stores. Those skip reading each output line before overwriting it (a quarter
// of the forward pass's traffic, up to two sevenths of the backward's) but send the output
// to memory: worth it when the operands do not fit in the last-level cache, or when the
// output's memory has most likely left it. A loop of forward calls on one 64x16384 float32
// input, which reuses one block written one call (12 MiB) earlier, ran at 150-235 us a call
// with cached stores and 240-300 us streamed; a forward+backward loop, whose outputs take
// blocks written 20-44 MiB of traffic earlier, at 1.25-2.0 ms a step cached and 0.84-1.35 ms
// streamed. Half the cache is the bound on how long ago an output's memory may have been
// written; the other half is left for the call's own operands. Traffic of other ops is not
// counted, so the estimate errs towards cached stores.
bool streams_outputs(int64_t bytes, uint64_t since_written) {
#if defined(__SSE2__)
  const int64_t cache = stream_cache_bytes();
  const bool stream = bytes > cache || since_written > static_cast<uint64_t>(cache / 2);
  if (stream) streamed_calls.fetch_add(1, std::memory_order_relaxed);
  return stream;
#else
  (void)bytes, (void)since_written;
  return false;
#endif
}

// float16 <-> float32 for the staged float16 loops. c10::Half's scalar conversion does
// not vectorise; F16C converts 8 at a time (round to nearest even, like c10::Half).
#if defined(KASMINA_HAS_F16C_PATH)
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

void half_to_float(const c10::Half* src, float* dst, int64_t n) {
#if defined(KASMINA_HAS_F16C_PATH)
  if (cpu_has_f16c()) return half_to_float_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void float_to_half(const float* src, c10::Half* dst, int64_t n) {
#if defined(KASMINA_HAS_F16C_PATH)
  if (cpu_has_f16c()) return float_to_half_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// float16 runs are computed in stages of kStage elements through float32 buffers, and
// streamed runs (see streams_outputs) through a stage buffer in L1.
constexpr int64_t kStage = 512;

template <typename scalar_t, typename acc_t>
KASMINA_RUN_LOOP void forward_run(scalar_t* __restrict__ out, const scalar_t* __restrict__ base,
                                  const scalar_t* __restrict__ bp, const acc_t* __restrict__ weight, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    float b[kStage], p[kStage], o[kStage];
    for (int64_t i = 0; i < n; i += kStage) {
      const int64_t m = std::min(kStage, n - i);
      half_to_float(base + i, b, m);
      half_to_float(bp + i, p, m);
      forward_run<float, float>(o, b, p, weight + i, m);
      float_to_half(o, out + i, m);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<scalar_t>(
          blend_value<acc_t>(static_cast<acc_t>(base[i]), static_cast<acc_t>(bp[i]), weight[i]));
    }
  }
}

// The dtypes the AVX2 row loops take (blend_avx2.h), and whether this machine runs them.
template <typename scalar_t>
constexpr bool kVectorRows = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// KASMINA_CPU_AVX2_ROWS=0 turns them off, so that the portable loops can be compared with
// them on one machine.
bool uses_avx2_rows() {
  static const bool wanted = env_switch("KASMINA_CPU_AVX2_ROWS", true);  // checked on every machine
#if defined(KASMINA_HAS_AVX2_ROWS)
  static const bool uses = wanted && __builtin_cpu_supports("avx2");
  return uses;
#else
  return false;
#endif
}

// forward_run through a stage buffer in L1, streamed out with non-temporal stores (see
// streams_outputs).
template <typename scalar_t, typename acc_t>
KASMINA_NOINLINE void forward_run_streamed(scalar_t* out, const scalar_t* base, const scalar_t* bp,
                                           const acc_t* weight, int64_t n) {
  alignas(64) scalar_t stage[kStage];
  for (int64_t i = 0; i < n; i += kStage) {
    const int64_t m = std::min(kStage, n - i);
    forward_run<scalar_t, acc_t>(stage, base + i, bp + i, weight + i, m);
    copy_bytes(out + i, stage, static_cast<size_t>(m) * sizeof(scalar_t), true);
  }
}

// The AVX2 row loop of a forward call (blend_avx2.h), or nullptr where the machine or the
// dtype has none (then the kernel walks the runs).
template <typename scalar_t, typename acc_t>
auto forward_row_loop(const Layout<acc_t>& layout, bool stream) {
  using Row = void (*)(scalar_t*, const scalar_t*, const scalar_t*, const acc_t*, int64_t, bool);
  Row row = nullptr;
#if defined(KASMINA_HAS_AVX2_ROWS)
  if constexpr (kVectorRows<scalar_t>) {
    if (uses_avx2_rows()) {
      const bool all_active = layout.all_active();
      using avx2::forward_row;
      row = stream ? (all_active ? &forward_row<scalar_t, true, true> : &forward_row<scalar_t, true, false>)
                   : (all_active ? &forward_row<scalar_t, false, true> : &forward_row<scalar_t, false, false>);
    }
  }
#else
  (void)layout, (void)stream;
#endif
  return row;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const BlendArgs& a, at::Tensor& out) {
  const scalar_t* base = a.base.data_ptr<scalar_t>();
  const scalar_t* bp = a.blueprint.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const Layout<acc_t> layout(a.alpha.data_ptr<acc_t>(), a.rows, a.dim, a.num_chunks, kTileElements);
  const acc_t* weight = layout.weight;
  const int64_t bytes = 3 * a.rows * a.dim * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = streams_outputs(bytes, mark_written(out, advance_blend_clock(bytes)));
  const auto row_loop = forward_row_loop<scalar_t, acc_t>(layout, stream);
  const bool hint = layout.mixed();  // keep_stream where rows with active chunks skip blueprint_out
  layout.for_each_tile([&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t at = row * a.dim;
      if (row_loop) {
        row_loop(o + at + c0, base + at + c0, bp + at + c0, weight + c0, c1 - c0, hint);
        continue;
      }
      layout.for_each_run(c0, c1, [&](int64_t lo, int64_t hi, bool active) {
        const size_t bytes = static_cast<size_t>(hi - lo) * sizeof(scalar_t);
        if (!active) {
          copy_bytes(o + at + lo, base + at + lo, bytes, streams_run(stream, bytes));
        } else if (streams_run(stream, bytes)) {
          forward_run_streamed<scalar_t, acc_t>(o + at + lo, base + at + lo, bp + at + lo, weight + lo, hi - lo);
        } else {
          forward_run<scalar_t, acc_t>(o + at + lo, base + at + lo, bp + at + lo, weight + lo, hi - lo);
        }
      });
    }
    if (stream) stream_fence();
  });
}

// One active run of one row of the backward pass; adds its grad_alpha terms to colsum.
template <typename scalar_t, typename acc_t, bool NB, bool NP, bool NA>
KASMINA_RUN_LOOP void backward_run(const scalar_t* __restrict__ g, const scalar_t* __restrict__ base,
                                   const scalar_t* __restrict__ bp, scalar_t* __restrict__ gb,
                                   scalar_t* __restrict__ gp, const acc_t* __restrict__ weight,
                                   acc_t* __restrict__ colsum, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    float fg[kStage], fb[kStage], fp[kStage], fgb[kStage], fgp[kStage];
    for (int64_t i = 0; i < n; i += kStage) {
      const int64_t m = std::min(kStage, n - i);
      half_to_float(g + i, fg, m);
      if constexpr (NA) {
        half_to_float(base + i, fb, m);
        half_to_float(bp + i, fp, m);
      }
      backward_run<float, float, NB, NP, NA>(fg, fb, fp, fgb, fgp, weight + i, NA ? colsum + i : nullptr, m);
      if constexpr (NB) float_to_half(fgb, gb + i, m);
      if constexpr (NP) float_to_half(fgp, gp + i, m);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t gv = static_cast<acc_t>(g[i]);
      if constexpr (NB) gb[i] = static_cast<scalar_t>(grad_base_value<acc_t>(gv, weight[i]));
      if constexpr (NP) gp[i] = static_cast<scalar_t>(grad_blueprint_value<acc_t>(gv, weight[i]));
      if constexpr (NA) {
        colsum[i] += grad_alpha_term<acc_t>(gv, static_cast<acc_t>(base[i]), static_cast<acc_t>(bp[i]));
      }
    }
  }
}

// backward_run with grad_base and grad_blueprint_out written through stage buffers in L1
// and streamed out with non-temporal stores (see streams_outputs).
template <typename scalar_t, typename acc_t, bool NB, bool NP, bool NA>
KASMINA_NOINLINE void backward_run_streamed(const scalar_t* g, const scalar_t* base, const scalar_t* bp, scalar_t* gb,
                                            scalar_t* gp, const acc_t* weight, acc_t* colsum, int64_t n) {
  alignas(64) scalar_t stage_b[NB ? kStage : 1];
  alignas(64) scalar_t stage_p[NP ? kStage : 1];
  for (int64_t i = 0; i < n; i += kStage) {
    const int64_t m = std::min(kStage, n - i);
    const size_t bytes = static_cast<size_t>(m) * sizeof(scalar_t);
    backward_run<scalar_t, acc_t, NB, NP, NA>(g + i, base + i, bp + i, stage_b, stage_p, weight + i,
                                              NA ? colsum + i : nullptr, m);
    if constexpr (NB) copy_bytes(gb + i, stage_b, bytes, true);
    if constexpr (NP) copy_bytes(gp + i, stage_p, bytes, true);
  }
}

// The AVX2 row loop of a backward call (blend_avx2.h), or nullptr where the machine or
// the dtype has none (then the kernel walks the runs).
template <typename scalar_t, typename acc_t, bool NB, bool NP, bool NA>
auto backward_row_loop(const Layout<acc_t>& layout, bool stream, const scalar_t* gb, const scalar_t* gp) {
  using Row = void (*)(const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, scalar_t*, const acc_t*, acc_t*,
                       int64_t, bool);
  Row row = nullptr;
#if defined(KASMINA_HAS_AVX2_ROWS)
  if constexpr (kVectorRows<scalar_t>) {
    if (uses_avx2_rows()) {
      // both outputs are streamed a line at a time in step: they must share their alignment,
      // and not alias in their page offsets (output_cache.h)
      const bool streams = stream && (!NB || !NP || (reinterpret_cast<uintptr_t>(gb) % 64 ==
                                                         reinterpret_cast<uintptr_t>(gp) % 64 &&
                                                     apart_in_page(gb, gp)));
      const bool all_active = layout.all_active();
      using avx2::backward_row;
      row = streams ? (all_active ? &backward_row<scalar_t, NB, NP, NA, true, true>
                                  : &backward_row<scalar_t, NB, NP, NA, true, false>)
                    : (all_active ? &backward_row<scalar_t, NB, NP, NA, false, true>
                                  : &backward_row<scalar_t, NB, NP, NA, false, false>);
    }
  }
#else
  (void)layout, (void)stream, (void)gb, (void)gp;
#endif
  return row;
}

template <typename scalar_t, typename acc_t, bool NB, bool NP, bool NA>
void backward_kernel(const BlendArgs& a, const at::Tensor& grad, at::Tensor& grad_base, at::Tensor& grad_bp,
                     at::Tensor& grad_alpha) {
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* base = a.base.data_ptr<scalar_t>();
  const scalar_t* bp = a.blueprint.data_ptr<scalar_t>();
  scalar_t* gb = NB ? grad_base.data_ptr<scalar_t>() : nullptr;
  scalar_t* gp = NP ? grad_bp.data_ptr<scalar_t>() : nullptr;
  const int64_t S = a.num_chunks;
  const Layout<acc_t> layout(a.alpha.data_ptr<acc_t>(), a.rows, a.dim, S, NA ? kSumTileElements : kTileElements,
                             NA ? std::clamp<int64_t>(kMaxPartials / S, 1, kMaxTasks) : kMaxTasks,
                             NA ? kSumTileColumnBytes / static_cast<int64_t>(sizeof(acc_t)) : a.dim);
  const acc_t* weight = layout.weight;
  double* partials = NA ? scratch<double, 3>(static_cast<size_t>(layout.num_tasks * S)) : nullptr;
  if constexpr (NA) std::fill(partials, partials + layout.num_tasks * S, 0.0);
  // grad is read always, base and blueprint_out only for grad_alpha
  const int64_t bytes =
      ((NA ? 3 : 1) + (NB ? 1 : 0) + (NP ? 1 : 0)) * a.rows * a.dim * static_cast<int64_t>(sizeof(scalar_t));
  const uint64_t now = advance_blend_clock(bytes);
  const bool stream = streams_outputs(bytes, std::max(NB ? mark_written(grad_base, now) : 0,
                                                      NP ? mark_written(grad_bp, now) : 0));
  const auto row_loop = backward_row_loop<scalar_t, acc_t, NB, NP, NA>(layout, stream, gb, gp);
  const bool hint = layout.mixed();  // as in forward_kernel

  layout.for_each_tile([&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t task) {
    // per-feature sums of the current tile, in the running thread's own scratch
    acc_t* colsum = NA ? scratch<acc_t, 4>(static_cast<size_t>(layout.tile_cols)) : nullptr;
    if constexpr (NA) std::fill(colsum, colsum + (c1 - c0), acc_t(0));
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t offset = row * a.dim;
      if (row_loop) {
        const int64_t at = offset + c0;
        row_loop(g + at, base + at, bp + at, NB ? gb + at : nullptr, NP ? gp + at : nullptr, weight + c0, colsum,
                 c1 - c0, hint);
        continue;
      }
      layout.for_each_run(c0, c1, [&](int64_t lo, int64_t hi, bool active) {
        const int64_t at = offset + lo;
        const size_t bytes = static_cast<size_t>(hi - lo) * sizeof(scalar_t);
        if (active) {
          const auto run = streams_run(stream, bytes) ? backward_run_streamed<scalar_t, acc_t, NB, NP, NA>
                                                      : backward_run<scalar_t, acc_t, NB, NP, NA>;
          run(g + at, base + at, bp + at, NB ? gb + at : nullptr, NP ? gp + at : nullptr, weight + lo,
              NA ? colsum + (lo - c0) : nullptr, hi - lo);
        } else {
          // alpha == 0: out == base, so grad_base = g and nothing flows to blueprint_out or alpha.
          if constexpr (NB) copy_bytes(gb + at, g + at, bytes, streams_run(stream, bytes));
          if constexpr (NP) zero_bytes(gp + at, bytes, streams_run(stream, bytes));
        }
      });
    }
    if (stream) stream_fence();
    if constexpr (NA) {
      double* partial = partials + task * S;
      for (int64_t s = chunk_of(c0, a.dim, S); s < S && layout.begins[s] < c1; ++s) {
        if (!chunk_active(weight[layout.begins[s]])) continue;
        double sum = 0.0;
        for (int64_t d = std::max(layout.begins[s], c0); d < std::min(layout.begins[s + 1], c1); ++d) {
          sum += static_cast<double>(colsum[d - c0]);
        }
        partial[s] += sum;
      }
    }
  });

  if constexpr (NA) {  // grad_alpha has alpha's dtype: float32, or float64 (then acc_t is double too)
    const bool float64 = grad_alpha.scalar_type() == at::kDouble;
    double* out64 = float64 ? grad_alpha.data_ptr<double>() : nullptr;
    float* out32 = float64 ? nullptr : grad_alpha.data_ptr<float>();
    for (int64_t s = 0; s < S; ++s) {
      double total = 0.0;
      for (int64_t task = 0; task < layout.num_tasks; ++task) total += partials[task * S + s];
      const acc_t sum = static_cast<acc_t>(total);
      if (float64) {
        out64[s] = static_cast<double>(sum);
      } else {
        out32[s] = static_cast<float>(sum);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_dispatch(const BlendArgs& a, const at::Tensor& grad, at::Tensor& gb, at::Tensor& gp, at::Tensor& ga,
                       bool nb, bool np, bool na) {
  const int mask = (nb ? 4 : 0) | (np ? 2 : 0) | (na ? 1 : 0);
  switch (mask) {
    case 7: backward_kernel<scalar_t, acc_t, true, true, true>(a, grad, gb, gp, ga); break;
    case 6: backward_kernel<scalar_t, acc_t, true, true, false>(a, grad, gb, gp, ga); break;
    case 5: backward_kernel<scalar_t, acc_t, true, false, true>(a, grad, gb, gp, ga); break;
    case 4: backward_kernel<scalar_t, acc_t, true, false, false>(a, grad, gb, gp, ga); break;
    case 3: backward_kernel<scalar_t, acc_t, false, true, true>(a, grad, gb, gp, ga); break;
    case 2: backward_kernel<scalar_t, acc_t, false, true, false>(a, grad, gb, gp, ga); break;
    case 1: backward_kernel<scalar_t, acc_t, false, false, true>(a, grad, gb, gp, ga); break;
    default: break;
  }
}

at::Tensor chunked_blend_cpu(const at::Tensor& base, const at::Tensor& blueprint_out, const at::Tensor& alpha,
                             int64_t num_chunks) {
  const BlendArgs args = prepare_blend_args(base, blueprint_out, alpha, num_chunks, "chunked_blend");
  at::Tensor out = empty_output(base.sizes(), args.base.options());
  if (out.numel() == 0) return out;
  dispatch_blend_dtype(args.base.scalar_type(), "chunked_blend", [&](auto scalar, auto acc) {
    forward_kernel<decltype(scalar), decltype(acc)>(args, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunked_blend_backward_cpu(
    const at::Tensor& grad, const at::Tensor& base, const at::Tensor& blueprint_out, const at::Tensor& alpha,
    int64_t num_chunks, bool need_base, bool need_blueprint, bool need_alpha) {
  constexpr const char* op = "chunked_blend_backward";
  BlendBackwardArgs b = prepare_blend_backward_args(grad, base, blueprint_out, alpha, num_chunks, need_base,
                                                    need_blueprint, op, &empty_output);
  const BlendArgs& args = b.args;
  const at::Tensor& g = b.grad;
  at::Tensor& gb = b.grad_base;
  at::Tensor& gp = b.grad_blueprint;
  at::Tensor ga = need_alpha ? at::zeros({num_chunks}, alpha.options()) : at::empty({0}, alpha.options());
  if (base.numel() == 0) return {gb, gp, ga};
  dispatch_blend_dtype(args.base.scalar_type(), op, [&](auto scalar, auto acc) {
    backward_dispatch<decltype(scalar), decltype(acc)>(args, g, gb, gp, ga, need_base, need_blueprint, need_alpha);
  });
  return {gb, gp, ga};
}

}  // namespace

TORCH_LIBRARY_IMPL(kasmina, CPU, m) {
  m.impl("chunked_blend", &chunked_blend_cpu);
  m.impl("chunked_blend_backward", &chunked_blend_backward_cpu);
}

TORCH_LIBRARY_IMPL(kasmina, CompositeImplicitAutograd, m) {
  m.impl("blend_stream_cache_bytes", &stream_cache_bytes);
  m.impl("blend_streamed_calls", &blend_streamed_calls);
  m.impl("blend_avx2_rows", &uses_avx2_rows);
}

}  // namespace blend
}  // namespace kasmina
