// CPU kernels of hvae_fast::categorical_log_likelihood and its backward.
// Forward: one log-sum-exp per row (max, then sum of exp, both over a row that
// sits in L1), saved for the backward; no [B, ..., K] temporary.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <limits>

#include "../inputs.h"
#include "../formulas.h"
#include "kernels.h"
#include "vec.h"

namespace hvae_fast {
namespace cpu {
inline namespace HVAE_FAST_CPU_LEVEL {
namespace {

constexpr const char* kOp = "categorical_log_likelihood";
constexpr int64_t kRowsPerChunk = 64;
// A row's passes do too little work to hide the next row's memory latency: fetch rows
// this far ahead.
constexpr int64_t kPrefetchRows = 2;

template <typename I>
int64_t checked_class(const I* x, int64_t r, int64_t K) {
  int64_t k = 0;
  TORCH_CHECK_INDEX(math::class_index(x[r], K, k), kOp, ": x holds ", x[r],
                    " at flat position ", r, ", which is not a class index in 0..", K - 1);
  return k;
}

// Folds a row with step(acc, l) into four vector accumulators, so that neighbouring
// vectors do not wait on each other, then joins them and the scalar tail with join.
// The order depends on K alone.
template <typename S, typename Step, typename Join>
S row_fold(const S* row, int64_t K, S init, const Step& step, const Join& join) {
  using Vec = at::vec::Vectorized<S>;
  constexpr int64_t W = Vec::size();
  Vec a0(init), a1(init), a2(init), a3(init);
  int64_t k = 0;
  for (; k + 4 * W <= K; k += 4 * W) {
    a0 = step(a0, Vec::loadu(row + k));
    a1 = step(a1, Vec::loadu(row + k + W));
    a2 = step(a2, Vec::loadu(row + k + 2 * W));
    a3 = step(a3, Vec::loadu(row + k + 3 * W));
  }
  for (; k + W <= K; k += W) a0 = step(a0, Vec::loadu(row + k));
  S r = at::vec::vec_reduce_all<S>(join, join(join(a0, a1), join(a2, a3)));
  for (; k < K; ++k) r = step(r, row[k]);
  return r;
}

// A row's max m and s = sum(exp(l - m)).
template <typename S>
std::pair<S, S> row_max_sum(const S* row, int64_t K) {
  const auto max = [](auto a, auto b) { return math::shift_max_(a, b); };
  const S m = row_fold(row, K, -std::numeric_limits<S>::infinity(), max, max);
  const S s = row_fold(
      row, K, S(0), [m](auto acc, auto l) { return acc + math::lse_exp_term(l, decltype(l)(m)); },
      [](auto a, auto b) { return a + b; });
  return {m, s};
}

std::tuple<at::Tensor, at::Tensor> categorical_log_likelihood_cpu(const at::Tensor& logits_,
                                                                   const at::Tensor& x_, bool /*overwrite_logits: read by the autograd backward*/) {
  check_likelihood(logits_, x_, true, kOp);
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_index(x_);
  const int64_t B = logits.size(0), K = logits.size(-1);
  const int64_t D = x.numel() / B;
  at::Tensor ll = at::empty({B}, logits.options());
  at::Tensor lse = at::empty(lse_shape(x_), logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kOp, [&] {
    using S = scalar_t;
    const S* l = logits.const_data_ptr<S>();
    S* lse_p = lse.data_ptr<S>();
    dispatch_index(x, [&](const auto* xp) {
      cpu::row_sum<S>(B, D, kRowsPerChunk, K * 2, ll.data_ptr<S>(), [&](int64_t b, int64_t d0, int64_t d1) {
        S acc = 0;
        for (int64_t r = b * D + d0; r < b * D + d1; ++r) {
          const int64_t k = checked_class(xp, r, K);
          const S* row = l + r * K;
          cpu::prefetch(row + kPrefetchRows * K, K, l + B * D * K);
          const auto [m, s] = row_max_sum(row, K);
          const S log_s = math::log_(s);
          lse_p[2 * r] = m;
          lse_p[2 * r + 1] = log_s;
          acc += math::log_softmax_at(row[k], m, log_s);
        }
        return acc;
      });
    });
  });
  return {ll, lse};
}

// out = grad * (onehot(x) - softmax(logits)); out may be logits itself (the in-place op).
void backward_into(const char* op, const at::Tensor& grad, const at::Tensor& logits_, const at::Tensor& x_,
                   const at::Tensor& lse_, const at::Tensor& out) {
  check_likelihood(logits_, x_, true, op);
  const int64_t B = logits_.size(0), K = logits_.size(-1);
  check_grad_batch(grad, B, logits_, op);
  check_lse(lse_, x_, logits_, op);
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_index(x_);
  const at::Tensor lse = lse_.to(logits.scalar_type()).contiguous();
  const at::Tensor g = grad.to(logits.scalar_type()).contiguous();
  const int64_t D = x.numel() / B;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "categorical_log_likelihood_backward", [&] {
    using S = scalar_t;
    const S* l = logits.const_data_ptr<S>();
    const S* lse_p = lse.const_data_ptr<S>();
    const S* gp = g.const_data_ptr<S>();
    S* o = out.data_ptr<S>();
    dispatch_index(x, [&](const auto* xp) {
      const int64_t grain = std::max<int64_t>(1, cpu::kGrainElems / (K * 3));
      at::parallel_for(0, B * D, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t k = checked_class(xp, r, K);
          const S gr = gp[r / std::max<int64_t>(D, 1)], m = lse_p[2 * r], log_s = lse_p[2 * r + 1];
          const S* row = l + r * K;
          cpu::prefetch(row + kPrefetchRows * K, K, l + B * D * K);
          const S target = row[k];  // read before the row may be overwritten
          S* orow = o + r * K;
          cpu::vec_for<S>(0, K, [&](int64_t j, auto zero) {
            using V = decltype(zero);
            cpu::store(orow + j, math::categorical_grad(V(gr), cpu::load(row + j, zero), V(m), V(log_s), zero));
          });
          orow[k] = math::categorical_grad(gr, target, m, log_s, S(1));
        }
      });
    });
  });
}

at::Tensor categorical_log_likelihood_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                   const at::Tensor& x, const at::Tensor& lse) {
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  cpu::huge_pages(out);
  backward_into("categorical_log_likelihood_backward", grad, logits, x, lse, out);
  return out;
}

void categorical_log_likelihood_backward__cpu(const at::Tensor& grad, const at::Tensor& logits,
                                              const at::Tensor& x, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "categorical_log_likelihood_backward_: logits must be contiguous "
                    "to hold their own gradient");
  backward_into("categorical_log_likelihood_backward_", grad, logits, x, lse, logits);
}

}  // namespace

HVAE_FAST_CPU_KERNELS(HVAE_FAST_DECLARE_KERNEL)
HVAE_FAST_EXPORT_KERNEL(categorical_log_likelihood, categorical_log_likelihood_cpu)
HVAE_FAST_EXPORT_KERNEL(categorical_log_likelihood_backward, categorical_log_likelihood_backward_cpu)
HVAE_FAST_EXPORT_KERNEL(categorical_log_likelihood_backward_, categorical_log_likelihood_backward__cpu)
}  // namespace HVAE_FAST_CPU_LEVEL
}  // namespace cpu

}  // namespace hvae_fast
