// CPU kernels of kasmina::chunked_blend and kasmina::chunked_blend_backward. The
// per-element formulas and the chunk layout are in blend_step.h; this file walks the
// (row, chunk) segments of the contiguous inputs with at::parallel_for.
//
// Work unit: a segment is one chunk of one row, a contiguous run of memory; segment
// index = row * num_chunks + chunk, so a range of segments is a contiguous range of the
// tensors. The segments are split into tasks of about kTaskElements elements; each task
// accumulates grad_alpha into its own row of partial sums (float64), which are added
// task by task at the end, so the result does not depend on thread scheduling.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "blend_args.h"
#include "blend_step.h"

namespace kasmina {
namespace blend {
namespace {

constexpr int64_t kTaskElements = 1 << 15;
constexpr int kLanes = 8;  // independent partial sums per span: vectorisable and more accurate

// Chunk boundaries: begins[s] .. begins[s + 1].
std::vector<int64_t> chunk_begins(int64_t dim, int64_t num_chunks) {
  std::vector<int64_t> begins(static_cast<size_t>(num_chunks + 1));
  for (int64_t s = 0; s <= num_chunks; ++s) begins[static_cast<size_t>(s)] = chunk_begin(s, dim, num_chunks);
  return begins;
}

// Number of tasks the segments are cut into (depends on the sizes and the thread count only).
int64_t task_count(int64_t segments, int64_t elements) {
  const int64_t by_size = std::max<int64_t>(1, elements / kTaskElements);
  const int64_t cap = std::max<int64_t>(1, 4 * static_cast<int64_t>(at::get_num_threads()));
  return std::max<int64_t>(1, std::min({segments, by_size, cap}));
}

// Runs body(segment_begin, segment_end, task) for every task, in parallel.
template <typename Body>
void for_each_task(int64_t segments, int64_t num_tasks, const Body& body) {
  at::parallel_for(0, num_tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      body(segments * task / num_tasks, segments * (task + 1) / num_tasks, task);
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_span(scalar_t* __restrict__ out, const scalar_t* __restrict__ base, const scalar_t* __restrict__ bp,
                  int64_t n, acc_t alpha) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(
        blend_value<acc_t>(static_cast<acc_t>(base[i]), static_cast<acc_t>(bp[i]), alpha));
  }
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const BlendArgs& a, at::Tensor& out) {
  const scalar_t* base = a.base.data_ptr<scalar_t>();
  const scalar_t* bp = a.blueprint.data_ptr<scalar_t>();
  const acc_t* alpha = a.alpha.data_ptr<acc_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t S = a.num_chunks;
  const std::vector<int64_t> begins = chunk_begins(a.dim, S);
  const int64_t segments = a.rows * S;
  for_each_task(segments, task_count(segments, a.rows * a.dim), [&](int64_t seg_begin, int64_t seg_end, int64_t) {
    int64_t row = seg_begin / S;
    int64_t s = seg_begin % S;
    for (int64_t seg = seg_begin; seg < seg_end; ++seg) {
      const int64_t offset = row * a.dim + begins[s];
      const int64_t n = begins[s + 1] - begins[s];
      if (chunk_active(alpha[s])) {
        forward_span<scalar_t, acc_t>(o + offset, base + offset, bp + offset, n, alpha[s]);
      } else {
        std::memcpy(o + offset, base + offset, static_cast<size_t>(n) * sizeof(scalar_t));
      }
      if (++s == S) {
        s = 0;
        ++row;
      }
    }
  });
}

// One active span of the backward pass; returns its grad_alpha contribution (0 unless NA).
template <typename scalar_t, typename acc_t, bool NB, bool NP, bool NA>
acc_t backward_span(const scalar_t* __restrict__ g, const scalar_t* __restrict__ base,
                    const scalar_t* __restrict__ bp, scalar_t* __restrict__ gb, scalar_t* __restrict__ gp, int64_t n,
                    acc_t alpha) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t gv = static_cast<acc_t>(g[i + j]);
      if constexpr (NB) gb[i + j] = static_cast<scalar_t>(grad_base_value<acc_t>(gv, alpha));
      if constexpr (NP) gp[i + j] = static_cast<scalar_t>(grad_blueprint_value<acc_t>(gv, alpha));
      if constexpr (NA) {
        lanes[j] += grad_alpha_term<acc_t>(gv, static_cast<acc_t>(base[i + j]), static_cast<acc_t>(bp[i + j]));
      }
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const acc_t gv = static_cast<acc_t>(g[i]);
    if constexpr (NB) gb[i] = static_cast<scalar_t>(grad_base_value<acc_t>(gv, alpha));
    if constexpr (NP) gp[i] = static_cast<scalar_t>(grad_blueprint_value<acc_t>(gv, alpha));
    if constexpr (NA) lanes[j] += grad_alpha_term<acc_t>(gv, static_cast<acc_t>(base[i]), static_cast<acc_t>(bp[i]));
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

template <typename scalar_t, typename acc_t, bool NB, bool NP, bool NA>
void backward_kernel(const BlendArgs& a, const at::Tensor& grad, at::Tensor& grad_base, at::Tensor& grad_bp,
                     at::Tensor& grad_alpha) {
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* base = a.base.data_ptr<scalar_t>();
  const scalar_t* bp = a.blueprint.data_ptr<scalar_t>();
  const acc_t* alpha = a.alpha.data_ptr<acc_t>();
  scalar_t* gb = NB ? grad_base.data_ptr<scalar_t>() : nullptr;
  scalar_t* gp = NP ? grad_bp.data_ptr<scalar_t>() : nullptr;
  const int64_t S = a.num_chunks;
  const std::vector<int64_t> begins = chunk_begins(a.dim, S);
  const int64_t segments = a.rows * S;
  const int64_t num_tasks = task_count(segments, a.rows * a.dim);
  std::vector<double> partials(NA ? static_cast<size_t>(num_tasks * S) : 0, 0.0);

  for_each_task(segments, num_tasks, [&](int64_t seg_begin, int64_t seg_end, int64_t task) {
    double* partial = NA ? partials.data() + task * S : nullptr;
    int64_t row = seg_begin / S;
    int64_t s = seg_begin % S;
    for (int64_t seg = seg_begin; seg < seg_end; ++seg) {
      const int64_t offset = row * a.dim + begins[s];
      const int64_t n = begins[s + 1] - begins[s];
      if (chunk_active(alpha[s])) {
        const acc_t sum = backward_span<scalar_t, acc_t, NB, NP, NA>(
            g + offset, base + offset, bp + offset, NB ? gb + offset : nullptr, NP ? gp + offset : nullptr, n,
            alpha[s]);
        if constexpr (NA) partial[s] += static_cast<double>(sum);
      } else {
        // alpha == 0: out == base, so grad_base = g and nothing flows to blueprint_out or alpha.
        if constexpr (NB) std::memcpy(gb + offset, g + offset, static_cast<size_t>(n) * sizeof(scalar_t));
        if constexpr (NP) std::memset(static_cast<void*>(gp + offset), 0, static_cast<size_t>(n) * sizeof(scalar_t));
      }
      if (++s == S) {
        s = 0;
        ++row;
      }
    }
  });

  if constexpr (NA) {
    at::Tensor sums = at::empty({S}, a.alpha.options());
    acc_t* out = sums.data_ptr<acc_t>();
    for (int64_t s = 0; s < S; ++s) {
      double total = 0.0;
      if (chunk_active(alpha[s])) {
        for (int64_t task = 0; task < num_tasks; ++task) total += partials[static_cast<size_t>(task * S + s)];
      }
      out[s] = static_cast<acc_t>(total);
    }
    grad_alpha.copy_(sums);
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
  at::Tensor out = at::empty(base.sizes(), args.base.options());
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
  const BlendArgs args = prepare_blend_args(base, blueprint_out, alpha, num_chunks, op);
  check_same_as_base(base, grad, "grad", op);
  const at::Tensor g = grad.contiguous();
  const at::Tensor unused = at::empty({0}, args.base.options());
  at::Tensor gb = need_base ? at::empty(base.sizes(), args.base.options()) : unused;
  at::Tensor gp = need_blueprint ? at::empty(base.sizes(), args.base.options()) : unused;
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

}  // namespace blend
}  // namespace kasmina
