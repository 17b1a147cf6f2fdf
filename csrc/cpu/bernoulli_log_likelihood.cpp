// CPU kernels of hvae_fast::bernoulli_log_likelihood and its backward.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "../inputs.h"
#include "../formulas.h"
#include "kernels.h"
#include "vec.h"

namespace hvae_fast {
namespace cpu {
inline namespace HVAE_FAST_CPU_LEVEL {
namespace {

constexpr const char* kOp = "bernoulli_log_likelihood";
constexpr int64_t kChunk = 4096;

// A chunk whose violation sum is not 0 holds a non-binary target: name the first.
template <typename S>
void check_binary(const S* x, int64_t begin, int64_t end, S violation) {
  if (violation == S(0)) return;
  for (int64_t i = begin; i < end; ++i)
    TORCH_CHECK_VALUE(x[i] == S(0) || x[i] == S(1), kOp, ": x must hold 0 or 1, got ", x[i],
                      " at flat position ", i);
}

at::Tensor bernoulli_log_likelihood_cpu(const at::Tensor& logits_, const at::Tensor& x_) {
  constexpr const char* op = kOp;
  check_likelihood(logits_, x_, false, op);
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_bernoulli_target(x_, logits, op);
  const int64_t B = logits.size(0), M = logits.numel() / B;
  at::Tensor ll = at::empty({B}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kOp, [&] {
    using S = scalar_t;
    const S* l = logits.const_data_ptr<S>();
    const S* xp = x.const_data_ptr<S>();
    cpu::row_sum<S>(B, M, kChunk, 4, ll.data_ptr<S>(), [&](int64_t b, int64_t begin, int64_t end) {
      cpu::SumAcc<S> acc, bad;
      cpu::vec_for<S>(b * M + begin, b * M + end, [&](int64_t i, auto zero) {
        const auto xi = cpu::load(xp + i, zero);
        acc.add(math::bernoulli_log_prob(cpu::load(l + i, zero), xi));
        bad.add(math::binary_violation(xi));
      });
      check_binary(xp, b * M + begin, b * M + end, bad.total());
      return acc.total();
    });
  });
  return ll;
}

at::Tensor bernoulli_log_likelihood_backward_cpu(const at::Tensor& grad, const at::Tensor& logits_,
                                                 const at::Tensor& x_) {
  constexpr const char* op = "bernoulli_log_likelihood_backward";
  check_likelihood(logits_, x_, false, op);
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_bernoulli_target(x_, logits, op);
  const int64_t B = logits.size(0), M = logits.numel() / B;
  check_grad_batch(grad, B, logits, op);
  const at::Tensor g = grad.to(logits.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(logits);
  cpu::huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), op, [&] {
    using S = scalar_t;
    const S* l = logits.const_data_ptr<S>();
    const S* xp = x.const_data_ptr<S>();
    const S* gp = g.const_data_ptr<S>();
    S* o = out.data_ptr<S>();
    cpu::for_row_chunks(B, M, kChunk, 4, [&](int64_t b, int64_t begin, int64_t end) {
      cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
          using V = decltype(zero);
          cpu::store(o + i, math::bernoulli_grad(V(gp[b]), cpu::load(l + i, zero), cpu::load(xp + i, zero)));
      });
    });
  });
  return out;
}

}  // namespace

HVAE_FAST_CPU_KERNELS(HVAE_FAST_DECLARE_KERNEL)
HVAE_FAST_EXPORT_KERNEL(bernoulli_log_likelihood, bernoulli_log_likelihood_cpu)
HVAE_FAST_EXPORT_KERNEL(bernoulli_log_likelihood_backward, bernoulli_log_likelihood_backward_cpu)
}  // namespace HVAE_FAST_CPU_LEVEL
}  // namespace cpu

}  // namespace hvae_fast
