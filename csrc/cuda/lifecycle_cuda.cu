// CUDA kernels of the lifecycle ops: kasmina::apply_transitions, kasmina::step_epoch and
// kasmina::state_summary. Every per-seed rule is in ../lifecycle_step.h, the same
// functions the CPU kernels (lifecycle_cpu.cpp) call; this file checks the tensors and
// runs those rules with one thread per request or seed.
//
// apply_transitions: a scratch int32 count per seed is zeroed, every in-range request
// adds 1 to its seed's count (atomicAdd), then a second kernel judges every request with
// that count as its `occurrences` and commits the accepted ones. Duplicates are all
// rejected, so no two threads ever write the same seed's row.
// state_summary: a shared-memory histogram per block, added to the output with one
// atomic per state per block.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "lifecycle_args.h"
#include "lifecycle_step.h"

namespace kasmina {
namespace {

namespace spec = ::kasmina::spec;
namespace lc = ::kasmina::lifecycle;

constexpr int kThreads = 256;

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 65535)));
}

// The state tensor of a CUDA kernel call: on a CUDA device, int32 (N, kNumStateColumns), contiguous.
void check_cuda_state(const at::Tensor& state) {
  TORCH_CHECK(state.is_cuda(), "kasmina: the CUDA kernel got state on ", state.device());
  lc::check_state(state);
}

__global__ void count_requests_kernel(const int64_t* __restrict__ seed_ids, int64_t num_requests, int64_t num_seeds,
                                      int32_t* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < num_requests; k += stride) {
    const int64_t s = seed_ids[k];
    if (lc::seed_in_range(s, num_seeds)) atomicAdd(counts + s, 1);
  }
}

template <typename StateIndex>
__global__ void judge_and_commit_kernel(int32_t* __restrict__ state, int32_t* __restrict__ history,
                                        int32_t* __restrict__ history_count, int64_t num_seeds,
                                        const int64_t* __restrict__ seed_ids,
                                        const StateIndex* __restrict__ from_states,
                                        const StateIndex* __restrict__ to_states, const float* __restrict__ context,
                                        const int32_t* __restrict__ min_epochs, const float* __restrict__ params,
                                        const int32_t* __restrict__ counts, int32_t* __restrict__ codes,
                                        int64_t num_requests) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < num_requests; k += stride) {
    const int64_t s = seed_ids[k];
    const int32_t occurrences = (counts != nullptr && lc::seed_in_range(s, num_seeds)) ? counts[s] : 1;
    const int64_t from = static_cast<int64_t>(from_states[k]);
    const int64_t to = static_cast<int64_t>(to_states[k]);
    const int32_t code = lc::judge_request(s, num_seeds, occurrences, state, from, to,
                                           context + k * spec::kNumContextFields, min_epochs, params);
    if (code == spec::REASON_OK) {
      lc::commit_transition(state + s * spec::kNumStateColumns, history + s * spec::kHistoryLength * 2,
                            history_count + s, static_cast<int32_t>(from), static_cast<int32_t>(to));
    }
    codes[k] = code;
  }
}

template <typename StateIndex>
void launch_apply(at::Tensor& state, at::Tensor& history, at::Tensor& history_count, const lc::ApplyArgs& args,
                  at::Tensor& codes, cudaStream_t stream) {
  const int64_t n = args.num_seeds;
  const int64_t k = args.num_requests;
  at::Tensor counts;
  if (k > 1) {  // a batch of one cannot hold duplicates
    counts = at::zeros({n}, state.options());
    count_requests_kernel<<<blocks_for(k), kThreads, 0, stream>>>(args.seed_ids.data_ptr<int64_t>(), k, n,
                                                                  counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  judge_and_commit_kernel<StateIndex><<<blocks_for(k), kThreads, 0, stream>>>(
      state.data_ptr<int32_t>(), history.data_ptr<int32_t>(), history_count.data_ptr<int32_t>(), n,
      args.seed_ids.data_ptr<int64_t>(), args.from_states.data_ptr<StateIndex>(),
      args.to_states.data_ptr<StateIndex>(), args.context.data_ptr<float>(), args.min_epochs.data_ptr<int32_t>(),
      args.params.data_ptr<float>(), k > 1 ? counts.data_ptr<int32_t>() : nullptr, codes.data_ptr<int32_t>(), k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor apply_transitions_cuda(at::Tensor& state, at::Tensor& history, at::Tensor& history_count,
                                  const at::Tensor& seed_ids, const at::Tensor& from_states,
                                  const at::Tensor& to_states, const at::Tensor& context,
                                  const at::Tensor& min_epochs, const at::Tensor& params) {
  check_cuda_state(state);
  const at::Device device = state.device();
  const c10::cuda::CUDAGuard guard(device);
  const lc::ApplyArgs args =
      lc::prepare_apply_args(state, history, history_count, seed_ids, from_states, to_states, context, min_epochs,
                             params);
  const int64_t k = args.num_requests;
  at::Tensor codes = at::empty({k}, seed_ids.options().dtype(at::kInt));
  if (k == 0) return codes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  if (args.from_states.scalar_type() == at::kInt) {
    launch_apply<int32_t>(state, history, history_count, args, codes, stream);
  } else {
    launch_apply<int64_t>(state, history, history_count, args, codes, stream);
  }
  return codes;
}

__global__ void step_epoch_kernel(int32_t* __restrict__ state, int64_t num_seeds) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_seeds; s += stride) {
    lc::step_row_epoch(state + s * spec::kNumStateColumns);
  }
}

void step_epoch_cuda(at::Tensor& state) {
  check_cuda_state(state);
  const int64_t n = state.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(state.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(state.get_device()).stream();
  step_epoch_kernel<<<blocks_for(n), kThreads, 0, stream>>>(state.data_ptr<int32_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void state_summary_kernel(const int32_t* __restrict__ state, int64_t num_seeds,
                                     unsigned long long* __restrict__ totals) {
  __shared__ unsigned int histogram[spec::kNumStates];
  for (int i = threadIdx.x; i < spec::kNumStates; i += blockDim.x) histogram[i] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_seeds; s += stride) {
    const int32_t st = state[s * spec::kNumStateColumns + spec::COL_LIFECYCLE_STATE];
    if (st >= 0 && st < spec::kNumStates) atomicAdd(histogram + st, 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < spec::kNumStates; i += blockDim.x) {
    if (histogram[i] != 0) atomicAdd(totals + i, static_cast<unsigned long long>(histogram[i]));
  }
}

at::Tensor state_summary_cuda(const at::Tensor& state) {
  check_cuda_state(state);
  const c10::cuda::CUDAGuard guard(state.device());
  at::Tensor out = at::zeros({spec::kNumStates}, state.options().dtype(at::kLong));
  const int64_t n = state.size(0);
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(state.get_device()).stream();
  // int64 counts are non-negative, so they are added as unsigned 64-bit integers.
  state_summary_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      state.data_ptr<int32_t>(), n, reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kasmina, CUDA, m) {
  m.impl("apply_transitions", &apply_transitions_cuda);
  m.impl("step_epoch", &step_epoch_cuda);
  m.impl("state_summary", &state_summary_cuda);
}

}  // namespace kasmina
