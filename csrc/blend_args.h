// Argument checks and preparation of the chunked blend ops, shared by the CPU kernels
// (blend_cpu.cpp) and the CUDA kernels (cuda/blend_cuda.cu). The messages match the
// Python checks in kasmina/_reference.py (check_blend_args).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <utility>

namespace kasmina {
namespace blend {

// The checked, contiguous operands of one call.
struct BlendArgs {
  at::Tensor base;       // contiguous (rows, dim) view of the input's memory
  at::Tensor blueprint;  // contiguous, same shape
  at::Tensor alpha;      // contiguous (num_chunks,), in the accumulation dtype
  int64_t rows;
  int64_t dim;
  int64_t num_chunks;
};

inline bool is_blend_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Float64 inputs accumulate in float64, every other dtype in float32.
inline at::ScalarType accumulation_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_same_as_base(const at::Tensor& base, const at::Tensor& other, const char* name, const char* op) {
  TORCH_CHECK_VALUE(other.sizes() == base.sizes(), op, ": ", name, " has shape ", other.sizes(),
                    " but base has shape ", base.sizes(), "; they must match");
  TORCH_CHECK_TYPE(other.scalar_type() == base.scalar_type(), op, ": ", name, " has dtype ", other.scalar_type(),
                   " but base has dtype ", base.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(other.device() == base.device(), op, ": ", name, " is on ", other.device(),
                    " but base is on ", base.device(), "; they must be on one device");
}

// Checks the operands (ValueError / TypeError naming the bad value) and returns them
// contiguous, alpha converted to the accumulation dtype.
inline BlendArgs prepare_blend_args(const at::Tensor& base, const at::Tensor& blueprint, const at::Tensor& alpha,
                                    int64_t num_chunks, const char* op) {
  TORCH_CHECK_VALUE(base.dim() >= 1, op, ": base must have at least one dimension (..., D), got a scalar");
  TORCH_CHECK_TYPE(is_blend_dtype(base.scalar_type()), op, ": base has dtype ", base.scalar_type(),
                   "; supported are float32, float16, bfloat16 and float64");
  check_same_as_base(base, blueprint, "blueprint_out", op);
  const int64_t dim = base.size(-1);
  TORCH_CHECK_VALUE(num_chunks >= 1 && num_chunks <= dim, op, ": num_chunks=", num_chunks,
                    " must be between 1 and the last dimension D=", dim);
  TORCH_CHECK_VALUE(alpha.dim() == 1 && alpha.size(0) == num_chunks, op, ": alpha must have shape (num_chunks,)=(",
                    num_chunks, ",), got ", alpha.sizes());
  const bool float64_alpha_ok = alpha.scalar_type() == at::kDouble && base.scalar_type() == at::kDouble;
  TORCH_CHECK_TYPE(alpha.scalar_type() == at::kFloat || float64_alpha_ok, op, ": alpha has dtype ", alpha.scalar_type(),
                   "; it must be float32 (or float64 when base is float64)");
  TORCH_CHECK_VALUE(alpha.device() == base.device(), op, ": alpha is on ", alpha.device(), " but base is on ",
                    base.device(), "; they must be on one device");
  BlendArgs args;
  args.base = base.contiguous();
  args.blueprint = blueprint.contiguous();
  args.alpha = alpha.to(accumulation_dtype(base.scalar_type())).contiguous();
  args.dim = dim;
  args.rows = dim == 0 ? 0 : base.numel() / dim;
  args.num_chunks = num_chunks;
  return args;
}

// The checked operands of one backward call, with the buffers of the element-wise
// gradients it returns.
struct BlendBackwardArgs {
  BlendArgs args;
  at::Tensor grad;            // contiguous, same shape, dtype and device as base
  at::Tensor grad_base;       // uninitialised, shaped like base when needed, else empty (0,)
  at::Tensor grad_blueprint;  // likewise
};

// Checks the operands of chunked_blend_backward (as prepare_blend_args, and grad like
// base) and allocates grad_base / grad_blueprint with new_output(sizes, options), the
// backend's allocation of an uninitialised output; grad_alpha is the kernel's to allocate.
template <typename NewOutput>
BlendBackwardArgs prepare_blend_backward_args(const at::Tensor& grad, const at::Tensor& base,
                                              const at::Tensor& blueprint, const at::Tensor& alpha, int64_t num_chunks,
                                              bool need_base, bool need_blueprint, const char* op,
                                              const NewOutput& new_output) {
  BlendBackwardArgs b;
  b.args = prepare_blend_args(base, blueprint, alpha, num_chunks, op);
  check_same_as_base(base, grad, "grad", op);
  b.grad = grad.contiguous();
  // an output that is not needed is empty, and each its own tensor (outputs never alias)
  const at::TensorOptions options = b.args.base.options();
  b.grad_base = new_output(need_base ? base.sizes() : at::IntArrayRef{0}, options);
  b.grad_blueprint = new_output(need_blueprint ? base.sizes() : at::IntArrayRef{0}, options);
  return b;
}

// Calls f(scalar_t{}, acc_t{}) for the dtype of the operands.
template <typename F>
void dispatch_blend_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{}, float{});
      break;
    case at::kDouble:
      f(double{}, double{});
      break;
    case at::kHalf:
      f(c10::Half{}, float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{}, float{});
      break;
    default:
      TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", t);
  }
}

}  // namespace blend
}  // namespace kasmina
