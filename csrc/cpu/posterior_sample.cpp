// CPU kernels of hvae_fast::posterior_sample and its backward.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../inputs.h"
#include "../formulas.h"
#include "vec.h"

namespace hvae_fast {
namespace {

constexpr int64_t kChunk = 4096;
constexpr const char* kOp = "posterior_sample";

template <bool kPrior, typename S>
void forward_kernel(const PosteriorArgs& a, double lo_, double hi_, S* z, S* kl) {
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = a.eps.const_data_ptr<S>();
  const S* mu_p = kPrior ? a.mu_p.const_data_ptr<S>() : nullptr;
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  const int64_t M = a.M;
  cpu::row_sum<S>(a.B, M, kChunk, 4, kl, [&](int64_t b, int64_t begin, int64_t end) {
    cpu::SumAcc<S> acc;
    const int64_t off = b * M;
    cpu::vec_for<S>(off + begin, off + end, [&](int64_t i, auto zero) {
      using V = decltype(zero);
      const V lo(static_cast<S>(lo_)), hi(static_cast<S>(hi_));
      V zi, kli;
      const V mp = kPrior ? cpu::load(mu_p + i, zero) : zero;
      const V lp = kPrior ? cpu::load(lv_p + i, zero) : zero;
      math::posterior_forward<kPrior>(cpu::load(dmu + i, zero), cpu::load(dlv + i, zero),
                                      cpu::load(eps + i, zero), mp, lp, lo, hi, zi, kli);
      cpu::store(z + i, zi);
      acc.add(kli);
    });
    return acc.total();
  });
}

std::tuple<at::Tensor, at::Tensor> posterior_sample_cpu(
    const at::Tensor& delta_mu, const at::Tensor& delta_logvar, const at::Tensor& eps,
    const c10::optional<at::Tensor>& mu_p, const c10::optional<at::Tensor>& logvar_p,
    double min_logvar, double max_logvar) {
  const PosteriorArgs a = prepare_posterior(delta_mu, delta_logvar, eps, mu_p, logvar_p, min_logvar, max_logvar, true);
  at::Tensor z = at::empty_like(a.dmu);
  cpu::huge_pages(z);
  at::Tensor kl = at::empty({a.B}, a.dmu.options());
  AT_DISPATCH_FLOATING_TYPES(a.dmu.scalar_type(), kOp, [&] {
    auto run = [&](auto prior) {
      forward_kernel<decltype(prior)::value, scalar_t>(a, min_logvar, max_logvar,
                                                       z.data_ptr<scalar_t>(), kl.data_ptr<scalar_t>());
    };
    if (a.prior) run(std::true_type{}); else run(std::false_type{});
  });
  return {z, kl};
}

template <bool kPrior, typename S>
void backward_kernel(const PosteriorArgs& a, const S* gz, const S* gkl, double lo_, double hi_,
                     S* g_dmu, S* g_dlv, S* g_eps, S* g_lvp) {
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = a.eps.const_data_ptr<S>();
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  const int64_t M = a.M;
  cpu::for_row_chunks(a.B, M, kChunk, 6, [&](int64_t b, int64_t begin, int64_t end) {
      cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
        using V = decltype(zero);
        const V lo(static_cast<S>(lo_)), hi(static_cast<S>(hi_)), gk(gkl[b]);
        V d_mu, d_lv, d_eps, d_lvp;
        const V lp = kPrior ? cpu::load(lv_p + i, zero) : zero;
        math::posterior_backward<kPrior>(cpu::load(gz + i, zero), gk, cpu::load(dmu + i, zero),
                                         cpu::load(dlv + i, zero), cpu::load(eps + i, zero), lp,
                                         lo, hi, d_mu, d_lv, d_eps, d_lvp);
        cpu::store(g_dmu + i, d_mu);
        cpu::store(g_dlv + i, d_lv);
        cpu::store(g_eps + i, d_eps);
        if (kPrior) cpu::store(g_lvp + i, d_lvp);
      });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> posterior_sample_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& delta_mu,
    const at::Tensor& delta_logvar, const at::Tensor& eps, const c10::optional<at::Tensor>& logvar_p,
    double min_logvar, double max_logvar) {
  PosteriorBackward r = prepare_posterior_backward(grad_z, grad_kl, delta_mu, delta_logvar, eps, logvar_p,
                                                   min_logvar, max_logvar);
  const PosteriorArgs& a = r.a;
  for (const at::Tensor* t : {&r.g_dmu, &r.g_dlv, &r.g_eps, &r.g_lvp}) cpu::huge_pages(*t);
  AT_DISPATCH_FLOATING_TYPES(a.dmu.scalar_type(), "posterior_sample_backward", [&] {
    auto run = [&](auto prior) {
      backward_kernel<decltype(prior)::value, scalar_t>(
          a, r.gz.const_data_ptr<scalar_t>(), r.gkl.const_data_ptr<scalar_t>(), min_logvar, max_logvar,
          r.g_dmu.data_ptr<scalar_t>(), r.g_dlv.data_ptr<scalar_t>(), r.g_eps.data_ptr<scalar_t>(),
          a.prior ? r.g_lvp.data_ptr<scalar_t>() : nullptr);
    };
    if (a.prior) run(std::true_type{}); else run(std::false_type{});
  });
  return {r.g_dmu, r.g_dlv, r.g_eps, r.g_lvp};
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CPU, m) {
  m.impl("posterior_sample", &posterior_sample_cpu);
  m.impl("posterior_sample_backward", &posterior_sample_backward_cpu);
}

}  // namespace hvae_fast
