// kasmina::chunk_moments: the mean of x and of x * x over every row and every feature of
// each chunk of a (rows, dim) float32 tensor, in one pass. It feeds the dormant seeds'
// activation telemetry (kasmina/layer.py), which runs on every training forward pass: as a
// dozen small torch calls it cost about a tenth of a Linear(1024, 1024) layer's step.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "blend_step.h"
#include "cpu_loop.h"
#include "scratch.h"

namespace kasmina {
namespace {

// Rows summed per task in float32 before their column sums are folded into float64; a
// fixed split, so that the result does not depend on the number of threads.
constexpr int64_t kRowsPerTask = 64;

// Adds one row to the column sums and column sums of squares.
KASMINA_RUN_LOOP void add_row(float* __restrict__ sum, float* __restrict__ square, const float* __restrict__ v,
                              int64_t dim) {
  for (int64_t i = 0; i < dim; ++i) {
    sum[i] += v[i];
    square[i] += v[i] * v[i];
  }
}

at::Tensor chunk_moments_cpu(const at::Tensor& values, int64_t num_chunks) {
  TORCH_CHECK_VALUE(values.dim() == 2, "chunk_moments: values must be (rows, dim), got shape ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, "chunk_moments: values must be float32, got ",
                   values.scalar_type());
  const int64_t rows = values.size(0);
  const int64_t dim = values.size(1);
  TORCH_CHECK_VALUE(num_chunks >= 1 && num_chunks <= dim, "chunk_moments: num_chunks must be in [1, ", dim,
                    "] for ", dim, " features, got ", num_chunks);
  at::Tensor out = at::empty({2, num_chunks}, values.options());
  if (rows == 0) return out.fill_(std::numeric_limits<float>::quiet_NaN());  // the mean of nothing, as torch.mean
  const at::Tensor x = values.contiguous();
  const float* data = x.data_ptr<float>();
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  double* partials = scratch<double, 10>(static_cast<size_t>(tasks * 2 * num_chunks));  // per task: sums, squares

  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    float* sum = scratch<float, 11>(static_cast<size_t>(dim));
    float* square = scratch<float, 12>(static_cast<size_t>(dim));
    for (int64_t task = task_begin; task < task_end; ++task) {
      std::fill(sum, sum + dim, 0.0f);
      std::fill(square, square + dim, 0.0f);
      for (int64_t row = task * kRowsPerTask; row < std::min(rows, (task + 1) * kRowsPerTask); ++row) {
        add_row(sum, square, data + row * dim, dim);
      }
      double* partial = partials + task * 2 * num_chunks;
      for (int64_t s = 0; s < num_chunks; ++s) {
        double chunk_sum = 0.0, chunk_square = 0.0;
        for (int64_t i = blend::chunk_begin(s, dim, num_chunks); i < blend::chunk_begin(s + 1, dim, num_chunks); ++i) {
          chunk_sum += sum[i];
          chunk_square += square[i];
        }
        partial[s] = chunk_sum;
        partial[num_chunks + s] = chunk_square;
      }
    }
  });

  float* mean = out.data_ptr<float>();
  for (int64_t s = 0; s < num_chunks; ++s) {
    double total_sum = 0.0, total_square = 0.0;
    for (int64_t task = 0; task < tasks; ++task) {
      total_sum += partials[task * 2 * num_chunks + s];
      total_square += partials[task * 2 * num_chunks + num_chunks + s];
    }
    const double count = static_cast<double>(rows) *
                         static_cast<double>(blend::chunk_begin(s + 1, dim, num_chunks) - blend::chunk_begin(s, dim, num_chunks));
    mean[s] = static_cast<float>(total_sum / count);
    mean[num_chunks + s] = static_cast<float>(total_square / count);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kasmina, CPU, m) { m.impl("chunk_moments", &chunk_moments_cpu); }

}  // namespace kasmina
