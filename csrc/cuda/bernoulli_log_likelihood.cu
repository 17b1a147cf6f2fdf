// CUDA kernels of hvae_fast::bernoulli_log_likelihood and its backward, line by line as
// csrc/cpu/bernoulli_log_likelihood.cpp: the forward's per-example sum is cuda::row_sum's
// two-stage, fixed-order reduction; the backward takes each example's gradient from its
// block (cuda::for_rows), not from a division per element. A target that is not 0 or 1
// is a device-side assert (the CUDA context is unusable afterwards), where the CPU raises
// a catchable ValueError.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../inputs.h"
#include "../formulas.h"
#include "launch.cuh"

namespace hvae_fast {
namespace {

template <typename S>
void launch_forward(const at::Tensor& logits, const at::Tensor& x, int64_t B, int64_t M, at::Tensor& ll) {
  using A = at::opmath_type<S>;
  const S* l = logits.const_data_ptr<S>();
  const S* xp = x.const_data_ptr<S>();
  cuda::row_sum<A>(B, M, ll.data_ptr<S>(), ll.device(), [=] __device__(int64_t, int64_t i) -> A {
    const A xi = static_cast<A>(xp[i]);
    CUDA_KERNEL_ASSERT(math::binary_violation(xi) == A(0) && "bernoulli_log_likelihood: x must hold 0 or 1");
    return math::bernoulli_log_prob(static_cast<A>(l[i]), xi);
  });
}

at::Tensor bernoulli_log_likelihood_cuda(const at::Tensor& logits_, const at::Tensor& x_) {
  constexpr const char* op = "bernoulli_log_likelihood";
  check_likelihood(logits_, x_, false, op);
  const c10::cuda::CUDAGuard guard(logits_.device());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_bernoulli_target(x_, logits, op);
  const int64_t B = logits.size(0), M = logits.numel() / B;
  at::Tensor ll = at::empty({B}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op,
                                  [&] { launch_forward<scalar_t>(logits, x, B, M, ll); });
  return ll;
}

template <typename S>
void launch_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& x, int64_t B, int64_t M,
                     at::Tensor& out) {
  using A = at::opmath_type<S>;
  const S* l = logits.const_data_ptr<S>();
  const S* xp = x.const_data_ptr<S>();
  const A* g = grad.const_data_ptr<A>();
  S* o = out.data_ptr<S>();
  cuda::for_rows(B, M, [=] __device__(int64_t b, int64_t i) {
    o[i] = static_cast<S>(math::bernoulli_grad(g[b], static_cast<A>(l[i]), static_cast<A>(xp[i])));
  });
}

at::Tensor bernoulli_log_likelihood_backward_cuda(const at::Tensor& grad, const at::Tensor& logits_,
                                                  const at::Tensor& x_) {
  constexpr const char* op = "bernoulli_log_likelihood_backward";
  check_likelihood(logits_, x_, false, op);
  const c10::cuda::CUDAGuard guard(logits_.device());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_bernoulli_target(x_, logits, op);
  const int64_t B = logits.size(0), M = logits.numel() / B;
  check_grad_batch(grad, B, logits, op);
  const at::Tensor g = grad.to(at::toOpMathType(logits.scalar_type())).contiguous();
  at::Tensor out = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op,
                                  [&] { launch_backward<scalar_t>(g, logits, x, B, M, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("bernoulli_log_likelihood", &bernoulli_log_likelihood_cuda);
  m.impl("bernoulli_log_likelihood_backward", &bernoulli_log_likelihood_backward_cuda);
}

}  // namespace hvae_fast
