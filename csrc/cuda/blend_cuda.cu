// CUDA kernels of kasmina::chunked_blend and kasmina::chunked_blend_backward. The
// per-element formulas and the chunk layout are in ../blend_step.h, shared with the CPU
// kernels, so both backends compute the same bits for the output and the element-wise
// gradients.
//
// Layout: the contiguous (rows, dim) inputs are covered by a 2-D grid. A thread owns V
// consecutive features of the last dimension (one 16-byte vector when dim % V == 0 and
// every pointer is 16-byte aligned, else V = 1) and walks rows with a grid stride. Its
// features' alphas are read once into registers, so a vector that straddles a chunk
// boundary is handled element by element and a vector of alpha == 0 features never
// loads blueprint_out.
//
// grad_alpha is a two-pass reduction without atomics: each block sums its rows per
// feature in shared memory and writes one row of partial sums (gridDim.y, dim); a second
// kernel reduces each chunk's slice of those partials with one block per chunk. The
// result is deterministic and contention-free at any number of chunks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "blend_args.h"
#include "blend_step.h"

namespace kasmina {
namespace blend {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& value) {
  *reinterpret_cast<Pack<T, V>*>(p) = value;
}

// Alphas of the thread's V features; whether all / any of them are active.
template <typename acc_t, int V>
struct FeatureAlphas {
  acc_t a[V];
  bool all_active = true;
  bool any_active = false;

  __device__ __forceinline__ FeatureAlphas(const acc_t* alpha, int64_t col, int64_t dim, int64_t num_chunks) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      a[j] = alpha[chunk_of(col + j, dim, num_chunks)];
      const bool active = chunk_active(a[j]);
      all_active = all_active && active;
      any_active = any_active || active;
    }
  }
};

template <typename scalar_t, typename acc_t, int V>
__global__ void forward_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ base,
                               const scalar_t* __restrict__ bp, const acc_t* __restrict__ alpha, int64_t rows,
                               int64_t dim, int64_t num_chunks) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (col >= dim) return;
  const FeatureAlphas<acc_t, V> fa(alpha, col, dim, num_chunks);
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += row_step) {
    const int64_t offset = row * dim + col;
    const Pack<scalar_t, V> b = load_pack<scalar_t, V>(base + offset);
    Pack<scalar_t, V> o = b;
    if (fa.all_active) {
      const Pack<scalar_t, V> p = load_pack<scalar_t, V>(bp + offset);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        o.v[j] = static_cast<scalar_t>(
            blend_value<acc_t>(static_cast<acc_t>(b.v[j]), static_cast<acc_t>(p.v[j]), fa.a[j]));
      }
    } else if (fa.any_active) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (chunk_active(fa.a[j])) {
          o.v[j] = static_cast<scalar_t>(
              blend_value<acc_t>(static_cast<acc_t>(b.v[j]), static_cast<acc_t>(bp[offset + j]), fa.a[j]));
        }
      }
    }
    store_pack<scalar_t, V>(out + offset, o);
  }
}

template <typename scalar_t, typename acc_t, int V, bool NB, bool NP, bool NA>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ base,
                                const scalar_t* __restrict__ bp, const acc_t* __restrict__ alpha,
                                scalar_t* __restrict__ grad_base, scalar_t* __restrict__ grad_bp,
                                acc_t* __restrict__ partials, int64_t rows, int64_t dim, int64_t num_chunks) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool in_range = col < dim;  // no early return: the block meets at __syncthreads below
  acc_t sums[V];
#pragma unroll
  for (int j = 0; j < V; ++j) sums[j] = acc_t(0);
  if (in_range) {
    const FeatureAlphas<acc_t, V> fa(alpha, col, dim, num_chunks);
    const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += row_step) {
      const int64_t offset = row * dim + col;
      const Pack<scalar_t, V> g = load_pack<scalar_t, V>(grad + offset);
      if constexpr (NB) {
        Pack<scalar_t, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          // alpha == 0: out == base, so grad_base is grad itself (copied, as the CPU kernel does)
          o.v[j] = chunk_active(fa.a[j]) ? static_cast<scalar_t>(grad_base_value<acc_t>(static_cast<acc_t>(g.v[j]), fa.a[j]))
                                         : g.v[j];
        }
        store_pack<scalar_t, V>(grad_base + offset, o);
      }
      if constexpr (NP) {
        Pack<scalar_t, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          o.v[j] = chunk_active(fa.a[j])
                       ? static_cast<scalar_t>(grad_blueprint_value<acc_t>(static_cast<acc_t>(g.v[j]), fa.a[j]))
                       : static_cast<scalar_t>(0.0f);
        }
        store_pack<scalar_t, V>(grad_bp + offset, o);
      }
      if constexpr (NA) {
        if (fa.any_active) {
          const Pack<scalar_t, V> b = load_pack<scalar_t, V>(base + offset);
          if (fa.all_active) {
            const Pack<scalar_t, V> p = load_pack<scalar_t, V>(bp + offset);
#pragma unroll
            for (int j = 0; j < V; ++j) {
              sums[j] += grad_alpha_term<acc_t>(static_cast<acc_t>(g.v[j]), static_cast<acc_t>(b.v[j]),
                                                static_cast<acc_t>(p.v[j]));
            }
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              if (chunk_active(fa.a[j])) {
                sums[j] += grad_alpha_term<acc_t>(static_cast<acc_t>(g.v[j]), static_cast<acc_t>(b.v[j]),
                                                  static_cast<acc_t>(bp[offset + j]));
              }
            }
          }
        }
      }
    }
  }
  if constexpr (NA) {
    // Sum the block's rows per feature, then write one partial row per blockIdx.y.
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
    const int width = blockDim.x * V;
#pragma unroll
    for (int j = 0; j < V; ++j) shared[threadIdx.y * width + threadIdx.x * V + j] = sums[j];
    __syncthreads();
    if (threadIdx.y == 0 && in_range) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t total = acc_t(0);
        for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += shared[y * width + threadIdx.x * V + j];
        partials[static_cast<int64_t>(blockIdx.y) * dim + col + j] = total;
      }
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// grad_alpha[s] = sum of the partials of chunk s (0 where alpha[s] == 0); one block per chunk.
template <typename acc_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partials, int64_t num_partial_rows,
                                       const acc_t* __restrict__ alpha, acc_t* __restrict__ grad_alpha, int64_t dim,
                                       int64_t num_chunks) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int64_t s = blockIdx.x; s < num_chunks; s += gridDim.x) {
    if (!chunk_active(alpha[s])) {  // the same for the whole block
      if (threadIdx.x == 0) grad_alpha[s] = acc_t(0);
      continue;
    }
    const int64_t begin = chunk_begin(s, dim, num_chunks);
    const int64_t width = chunk_begin(s + 1, dim, num_chunks) - begin;
    const int64_t count = num_partial_rows * width;
    acc_t sum = acc_t(0);
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
      const int64_t y = i / width;
      sum += partials[y * dim + begin + (i - y * width)];
    }
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
      sum = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : acc_t(0);
      sum = warp_sum(sum);
      if (threadIdx.x == 0) grad_alpha[s] = sum;
    }
    __syncthreads();  // warp_sums is reused by the next chunk
  }
}

int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// 2-D launch over (rows, dim / V): blocks of kThreads threads, x along features.
struct Launch {
  dim3 grid;
  dim3 block;
};

Launch plan_launch(int64_t rows, int64_t vectors_per_row, int device) {
  const int64_t bx = std::min<int64_t>(kThreads, (vectors_per_row + 31) / 32 * 32);
  const int64_t by = kThreads / bx;
  const int64_t gx = (vectors_per_row + bx - 1) / bx;
  const int64_t target_blocks = 8 * static_cast<int64_t>(multiprocessor_count(device));
  const int64_t gy = std::max<int64_t>(
      1, std::min<int64_t>({(rows + by - 1) / by, std::max<int64_t>(1, target_blocks / gx), 65535}));
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

template <typename scalar_t>
constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(sizeof(scalar_t));
}

template <typename scalar_t, typename acc_t, int V>
void launch_forward(const BlendArgs& a, at::Tensor& out, cudaStream_t stream) {
  const Launch l = plan_launch(a.rows, a.dim / V, a.base.get_device());
  forward_kernel<scalar_t, acc_t, V><<<l.grid, l.block, 0, stream>>>(
      out.data_ptr<scalar_t>(), a.base.data_ptr<scalar_t>(), a.blueprint.data_ptr<scalar_t>(),
      a.alpha.data_ptr<acc_t>(), a.rows, a.dim, a.num_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int V, bool NB, bool NP, bool NA>
void launch_backward(const BlendArgs& a, const at::Tensor& grad, at::Tensor& gb, at::Tensor& gp, at::Tensor& ga,
                     cudaStream_t stream) {
  const Launch l = plan_launch(a.rows, a.dim / V, a.base.get_device());
  at::Tensor partials;
  size_t shared_bytes = 0;
  if constexpr (NA) {
    partials = at::empty({static_cast<int64_t>(l.grid.y), a.dim}, a.alpha.options());
    shared_bytes = static_cast<size_t>(kThreads) * V * sizeof(acc_t);
  }
  backward_kernel<scalar_t, acc_t, V, NB, NP, NA><<<l.grid, l.block, shared_bytes, stream>>>(
      grad.data_ptr<scalar_t>(), a.base.data_ptr<scalar_t>(), a.blueprint.data_ptr<scalar_t>(),
      a.alpha.data_ptr<acc_t>(), NB ? gb.data_ptr<scalar_t>() : nullptr, NP ? gp.data_ptr<scalar_t>() : nullptr,
      NA ? partials.data_ptr<acc_t>() : nullptr, a.rows, a.dim, a.num_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (NA) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(a.num_chunks, 65535));
    reduce_partials_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        partials.data_ptr<acc_t>(), static_cast<int64_t>(l.grid.y), a.alpha.data_ptr<acc_t>(), ga.data_ptr<acc_t>(),
        a.dim, a.num_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t, int V>
void backward_dispatch(const BlendArgs& a, const at::Tensor& grad, at::Tensor& gb, at::Tensor& gp, at::Tensor& ga,
                       bool nb, bool np, bool na, cudaStream_t stream) {
  const int mask = (nb ? 4 : 0) | (np ? 2 : 0) | (na ? 1 : 0);
  switch (mask) {
    case 7: launch_backward<scalar_t, acc_t, V, true, true, true>(a, grad, gb, gp, ga, stream); break;
    case 6: launch_backward<scalar_t, acc_t, V, true, true, false>(a, grad, gb, gp, ga, stream); break;
    case 5: launch_backward<scalar_t, acc_t, V, true, false, true>(a, grad, gb, gp, ga, stream); break;
    case 4: launch_backward<scalar_t, acc_t, V, true, false, false>(a, grad, gb, gp, ga, stream); break;
    case 3: launch_backward<scalar_t, acc_t, V, false, true, true>(a, grad, gb, gp, ga, stream); break;
    case 2: launch_backward<scalar_t, acc_t, V, false, true, false>(a, grad, gb, gp, ga, stream); break;
    case 1: launch_backward<scalar_t, acc_t, V, false, false, true>(a, grad, gb, gp, ga, stream); break;
    default: break;
  }
}

void check_cuda(const at::Tensor& base, const char* op) {
  TORCH_CHECK_VALUE(base.is_cuda(), op, ": the CUDA kernel got base on ", base.device());
}

at::Tensor chunked_blend_cuda(const at::Tensor& base, const at::Tensor& blueprint_out, const at::Tensor& alpha,
                              int64_t num_chunks) {
  constexpr const char* op = "chunked_blend";
  check_cuda(base, op);
  const c10::cuda::CUDAGuard guard(base.device());
  const BlendArgs args = prepare_blend_args(base, blueprint_out, alpha, num_chunks, op);
  at::Tensor out = at::empty(base.sizes(), args.base.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(base.get_device()).stream();
  dispatch_blend_dtype(args.base.scalar_type(), op, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    constexpr int V = vector_width<scalar_t>();
    const bool vectorised = args.dim % V == 0 && aligned(args.base.data_ptr()) &&
                            aligned(args.blueprint.data_ptr()) && aligned(out.data_ptr());
    if (vectorised) {
      launch_forward<scalar_t, acc_t, V>(args, out, stream);
    } else {
      launch_forward<scalar_t, acc_t, 1>(args, out, stream);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunked_blend_backward_cuda(
    const at::Tensor& grad, const at::Tensor& base, const at::Tensor& blueprint_out, const at::Tensor& alpha,
    int64_t num_chunks, bool need_base, bool need_blueprint, bool need_alpha) {
  constexpr const char* op = "chunked_blend_backward";
  check_cuda(base, op);
  const c10::cuda::CUDAGuard guard(base.device());
  BlendBackwardArgs b = prepare_blend_backward_args(
      grad, base, blueprint_out, alpha, num_chunks, need_base, need_blueprint, op,
      [](at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); });
  const BlendArgs& args = b.args;
  const at::Tensor& g = b.grad;
  at::Tensor& gb = b.grad_base;
  at::Tensor& gp = b.grad_blueprint;
  // grad_alpha is summed in the accumulation dtype and returned in alpha's dtype.
  at::Tensor ga = need_alpha ? at::empty({num_chunks}, args.alpha.options()) : at::empty({0}, alpha.options());
  if (base.numel() == 0) {
    if (need_alpha) ga.zero_();
  } else {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(base.get_device()).stream();
    dispatch_blend_dtype(args.base.scalar_type(), op, [&](auto scalar, auto acc) {
      using scalar_t = decltype(scalar);
      using acc_t = decltype(acc);
      constexpr int V = vector_width<scalar_t>();
      const bool vectorised = args.dim % V == 0 && aligned(g.data_ptr()) && aligned(args.base.data_ptr()) &&
                              aligned(args.blueprint.data_ptr()) && (!need_base || aligned(gb.data_ptr())) &&
                              (!need_blueprint || aligned(gp.data_ptr()));
      if (vectorised) {
        backward_dispatch<scalar_t, acc_t, V>(args, g, gb, gp, ga, need_base, need_blueprint, need_alpha, stream);
      } else {
        backward_dispatch<scalar_t, acc_t, 1>(args, g, gb, gp, ga, need_base, need_blueprint, need_alpha, stream);
      }
    });
  }
  if (need_alpha && ga.scalar_type() != alpha.scalar_type()) ga = ga.to(alpha.scalar_type());
  return {gb, gp, ga};
}

}  // namespace

TORCH_LIBRARY_IMPL(kasmina, CUDA, m) {
  m.impl("chunked_blend", &chunked_blend_cuda);
  m.impl("chunked_blend_backward", &chunked_blend_backward_cuda);
}

}  // namespace blend
}  // namespace kasmina
