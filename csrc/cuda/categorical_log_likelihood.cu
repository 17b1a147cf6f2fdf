// CUDA kernels of hvae_fast::categorical_log_likelihood and its backward.
// Forward: a warp per row computes its log-sum-exp (max, then sum of exp over a row
// that the first pass left in cache), saved in float32 as (max, log sum) for the backward; then one
// block per example sums its rows. Backward: one thread per logit.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>

#include "../inputs.h"
#include "../formulas.h"
#include "launch.cuh"

namespace hvae_fast {
namespace {

constexpr int kRowsPerBlock = cuda::kThreads / cuda::kWarp;

template <typename S, typename I>
__global__ void row_lse_kernel(const S* logits, const I* x, int64_t R, int64_t K,
                               at::opmath_type<S>* lse, at::opmath_type<S>* row_ll) {
  using A = at::opmath_type<S>;
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / cuda::kWarp;
  if (r >= R) return;  // the whole warp leaves together
  const S* row = logits + r * K;
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t k = lane; k < K; k += cuda::kWarp) m = math::max_(m, static_cast<A>(row[k]));
  for (int off = cuda::kWarp / 2; off > 0; off >>= 1) m = math::max_(m, __shfl_xor_sync(cuda::kFullMask, m, off));
  A s = 0;
  for (int64_t k = lane; k < K; k += cuda::kWarp) s += math::lse_exp_term(static_cast<A>(row[k]), m);
  for (int off = cuda::kWarp / 2; off > 0; off >>= 1) s += __shfl_xor_sync(cuda::kFullMask, s, off);
  if (lane == 0) {
    int64_t k = 0;
    const bool ok = math::class_index(x[r], K, k);
    CUDA_KERNEL_ASSERT(ok && "categorical_log_likelihood: x holds a value that is not a class index in 0..K-1");
    const A log_s = math::log_(s);
    lse[2 * r] = m;
    lse[2 * r + 1] = log_s;
    row_ll[r] = ok ? math::log_softmax_at(static_cast<A>(row[k]), m, log_s) : std::numeric_limits<A>::quiet_NaN();
  }
}

template <typename S, typename I>
void launch_forward(const at::Tensor& logits, const I* x, int64_t B, int64_t D, int64_t K,
                    at::Tensor& ll, at::Tensor& lse) {
  using A = at::opmath_type<S>;
  const int64_t R = B * D;
  at::Tensor row_ll = at::empty({R}, logits.options().dtype(lse.scalar_type()));
  if (R > 0) {
    const int64_t blocks = (R + kRowsPerBlock - 1) / kRowsPerBlock;
    TORCH_CHECK(blocks <= INT32_MAX, "categorical_log_likelihood: too many rows (", R, ")");
    row_lse_kernel<S, I><<<static_cast<unsigned>(blocks), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<S>(), x, R, K, lse.data_ptr<A>(), row_ll.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const A* rl = row_ll.const_data_ptr<A>();
  cuda::row_sum<A>(B, D, ll.data_ptr<S>(), [=] __device__(int64_t, int64_t i) -> A { return rl[i]; });
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
    dispatch_index(x, [&](const auto* xp) { launch_forward<scalar_t>(logits, xp, B, D, K, ll, lse); });
  });
  return {ll, lse};
}

template <typename S, typename I>
void launch_backward(const at::Tensor& grad, const at::Tensor& logits, const I* x, const at::Tensor& lse_,
                     int64_t D, int64_t K, at::Tensor& out) {
  using A = at::opmath_type<S>;
  const S* l = logits.const_data_ptr<S>();
  const A* lse = lse_.const_data_ptr<A>();
  const A* g = grad.const_data_ptr<A>();
  S* o = out.data_ptr<S>();
  cuda::elementwise(out.numel(), [=] __device__(int64_t i) {
    const int64_t r = i / K, k = i - r * K;
    int64_t target = 0;
    const bool ok = math::class_index(x[r], K, target);
    CUDA_KERNEL_ASSERT(ok && "categorical_log_likelihood_backward: x holds a value that is not a class index");
    const A onehot = (ok && k == target) ? A(1) : A(0);
    o[i] = static_cast<S>(math::categorical_grad(g[r / D], static_cast<A>(l[i]), lse[2 * r], lse[2 * r + 1], onehot));
  });
}

// out = grad * (onehot(x) - softmax(logits)); out may be logits itself (the in-place op):
// each thread reads its logit before it writes the same element.
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
  const int64_t D = std::max<int64_t>(1, x.numel() / B);
  at::Tensor o = out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "categorical_log_likelihood_backward", [&] {
    dispatch_index(x, [&](const auto* xp) { launch_backward<scalar_t>(g, logits, xp, lse, D, K, o); });
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
