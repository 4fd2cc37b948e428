// Argument checks and preparation of the lifecycle ops (apply_transitions, step_epoch,
// state_summary), shared by the CPU kernels (lifecycle_cpu.cpp) and the CUDA kernels
// (cuda/lifecycle_cuda.cu). Device-generic: every operand must be on the state tensor's
// device; each kernel checks that the state tensor is on its own backend first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "generated/lifecycle_tables.h"

namespace kasmina {
namespace lifecycle {

// The checked, contiguous read-only operands of one apply_transitions call.
struct ApplyArgs {
  at::Tensor seed_ids;     // int64 (K,)
  at::Tensor from_states;  // int32 or int64 (K,), same dtype as to_states
  at::Tensor to_states;
  at::Tensor context;     // float32 (K, kNumContextFields)
  at::Tensor min_epochs;  // int32 (kNumStates,)
  at::Tensor params;      // float32 (kNumParams,)
  int64_t num_seeds;      // N, rows of the state tensor
  int64_t num_requests;   // K
};

// How the messages name a device: "the CPU", else the device itself ("cuda:0").
inline std::string device_phrase(const at::Device& device) { return device.is_cpu() ? "the CPU" : device.str(); }

inline void check_on_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "kasmina: ", name, " must be on ", device_phrase(device),
              " like the state tensor, got ", t.device());
}

inline void check_vector(const at::Tensor& t, const char* name, int64_t length, const at::Device& device) {
  check_on_device(t, name, device);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, "kasmina: ", name, " must have shape (", length, "), got ",
              t.sizes());
}

// Dtype, shape and layout of the state tensor (its device is the kernel's to check).
inline void check_state(const at::Tensor& state) {
  TORCH_CHECK(state.scalar_type() == at::kInt, "kasmina: state must be int32, got ", state.scalar_type());
  TORCH_CHECK(state.dim() == 2 && state.size(1) == spec::kNumStateColumns, "kasmina: state must have shape (N, ",
              spec::kNumStateColumns, "), got ", state.sizes());
  TORCH_CHECK(state.is_contiguous(), "kasmina: state must be contiguous");
}

// Checks the operands of apply_transitions against the already checked state tensor (the
// buffers it writes must be contiguous and on its device) and returns the read-only ones
// contiguous.
inline ApplyArgs prepare_apply_args(const at::Tensor& state, const at::Tensor& history,
                                    const at::Tensor& history_count, const at::Tensor& seed_ids,
                                    const at::Tensor& from_states, const at::Tensor& to_states,
                                    const at::Tensor& context, const at::Tensor& min_epochs,
                                    const at::Tensor& params) {
  const at::Device device = state.device();
  const int64_t n = state.size(0);
  check_on_device(history, "history", device);
  TORCH_CHECK(history.scalar_type() == at::kInt, "kasmina: history must be int32, got ", history.scalar_type());
  TORCH_CHECK(history.dim() == 3 && history.size(0) == n && history.size(1) == spec::kHistoryLength &&
                  history.size(2) == 2,
              "kasmina: history must have shape (", n, ", ", spec::kHistoryLength, ", 2), got ", history.sizes());
  TORCH_CHECK(history.is_contiguous(), "kasmina: history must be contiguous");
  check_vector(history_count, "history_count", n, device);
  TORCH_CHECK(history_count.scalar_type() == at::kInt, "kasmina: history_count must be int32, got ",
              history_count.scalar_type());
  TORCH_CHECK(history_count.is_contiguous(), "kasmina: history_count must be contiguous");

  TORCH_CHECK(seed_ids.dim() == 1, "kasmina: seed_ids must be 1-D, got shape ", seed_ids.sizes());
  const int64_t k = seed_ids.size(0);
  check_vector(seed_ids, "seed_ids", k, device);
  TORCH_CHECK(seed_ids.scalar_type() == at::kLong, "kasmina: seed_ids must be int64, got ", seed_ids.scalar_type());
  check_vector(from_states, "from_states", k, device);
  check_vector(to_states, "to_states", k, device);
  TORCH_CHECK(from_states.scalar_type() == to_states.scalar_type() &&
                  (from_states.scalar_type() == at::kInt || from_states.scalar_type() == at::kLong),
              "kasmina: from_states and to_states must both be int32 or both int64, got ", from_states.scalar_type(),
              " and ", to_states.scalar_type());
  check_on_device(context, "context", device);
  TORCH_CHECK(context.scalar_type() == at::kFloat, "kasmina: context must be float32, got ", context.scalar_type());
  TORCH_CHECK(context.dim() == 2 && context.size(0) == k && context.size(1) == spec::kNumContextFields,
              "kasmina: context must have shape (", k, ", ", spec::kNumContextFields, "), got ", context.sizes());
  check_vector(min_epochs, "min_epochs", spec::kNumStates, device);
  TORCH_CHECK(min_epochs.scalar_type() == at::kInt, "kasmina: min_epochs must be int32, got ",
              min_epochs.scalar_type());
  check_vector(params, "params", spec::kNumParams, device);
  TORCH_CHECK(params.scalar_type() == at::kFloat, "kasmina: params must be float32, got ", params.scalar_type());

  ApplyArgs args;
  args.seed_ids = seed_ids.contiguous();
  args.from_states = from_states.contiguous();
  args.to_states = to_states.contiguous();
  args.context = context.contiguous();
  args.min_epochs = min_epochs.contiguous();
  args.params = params.contiguous();
  args.num_seeds = n;
  args.num_requests = k;
  return args;
}

}  // namespace lifecycle
}  // namespace kasmina
