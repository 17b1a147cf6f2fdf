// CUDA kernels of hvae_fast::categorical_log_likelihood and its backward.
//
// Layout, chosen by K alone (so the reduction order, and the bits, depend on K, not on the
// number of rows): a row of K logits is taken by a team of G threads, G = 4, 8, 16 (several
// rows per warp: K <= 64), 32 (a warp: K < 2048) or the whole block of 256 (a block per
// row: K >= 2048). Block (b, c) of the grid takes chunk c of example b's D rows: the
// per-example sum of the forward and the upstream gradient of the backward come from the
// block, not from a division per row or per element. Rows whose K is a multiple of a
// 16-byte vector, at an aligned address, are read (and written) in 16-byte vectors.
//
// Forward, per row (line by line as csrc/cpu/categorical_log_likelihood.cpp): the max m
// by shift_max_, s = sum of lse_exp_term(l, m), log s; (m, log s) saved in float32 for
// the backward; the row's log_softmax_at of its class, summed into the example's total
// in the same kernel (one launch and no temporary when an example's rows fit in one
// chunk, else a second, fixed-order sum of the chunks' partial sums: cuda::row_sum's).
// Backward, per row: the class index, (m, log s) and the example's gradient loaded once,
// then categorical_grad over the row; out may be logits itself (the in-place op): each
// thread reads its logits before it writes the same elements.
//
// A class index out of range is a device-side assert (CUDA_KERNEL_ASSERT): the CUDA
// context is unusable afterwards; the CPU kernels raise a catchable IndexError instead.
//
// The kernels are in categorical_log_likelihood/ (kernels.cuh), compiled once per logits dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../inputs.h"
#include "categorical_log_likelihood/launchers.h"

namespace hvae_fast {
namespace {

// The launchers for logits of type S and indices of x's type.
template <typename S, typename I>
categorical_cuda::Launch<S, I> launcher(const I*) {
  return {};
}

std::tuple<at::Tensor, at::Tensor> categorical_log_likelihood_cuda(const at::Tensor& logits_,
                                                                    const at::Tensor& x_, bool /*overwrite_logits: read by the autograd backward*/) {
  constexpr const char* op = "categorical_log_likelihood";
  check_likelihood(logits_, x_, true, op);
  const c10::cuda::CUDAGuard guard(logits_.device());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_index(x_);
  const int64_t B = logits.size(0), K = logits.size(-1), D = x.numel() / B;
  const auto acc = at::toOpMathType(logits.scalar_type());
  at::Tensor ll = at::empty({B}, logits.options());
  at::Tensor lse = at::empty(lse_shape(x_), logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    dispatch_index(x, [&](const auto* xp) { launcher<scalar_t>(xp).forward(logits, xp, B, D, K, ll, lse); });
  });
  return {ll, lse};
}

void backward_into(const char* op, const at::Tensor& grad, const at::Tensor& logits_, const at::Tensor& x_,
                   const at::Tensor& lse_, const at::Tensor& out) {
  check_likelihood(logits_, x_, true, op);
  const c10::cuda::CUDAGuard guard(logits_.device());
  const int64_t B = logits_.size(0), K = logits_.size(-1);
  check_grad_batch(grad, B, logits_, op);
  check_lse(lse_, x_, logits_, op);
  const auto acc = at::toOpMathType(logits_.scalar_type());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_index(x_);
  const at::Tensor lse = lse_.to(acc).contiguous();
  const at::Tensor g = grad.to(acc).contiguous();
  const int64_t D = x.numel() / B;
  at::Tensor o = out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "categorical_log_likelihood_backward", [&] {
    dispatch_index(x, [&](const auto* xp) { launcher<scalar_t>(xp).backward(g, logits, xp, lse, B, D, K, o); });
  });
}

at::Tensor categorical_log_likelihood_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                    const at::Tensor& x, const at::Tensor& lse) {
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  backward_into("categorical_log_likelihood_backward", grad, logits, x, lse, out);
  return out;
}

void categorical_log_likelihood_backward__cuda(const at::Tensor& grad, const at::Tensor& logits,
                                               const at::Tensor& x, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "categorical_log_likelihood_backward_: logits must be contiguous "
                    "to hold their own gradient");
  backward_into("categorical_log_likelihood_backward_", grad, logits, x, lse, logits);
}


}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("categorical_log_likelihood", &categorical_log_likelihood_cuda);
  m.impl("categorical_log_likelihood_backward", &categorical_log_likelihood_backward_cuda);
  m.impl("categorical_log_likelihood_backward_", &categorical_log_likelihood_backward__cuda);
}

}  // namespace hvae_fast
