// CUDA kernels of hvae_fast::posterior_sample and its backward: the formulas of
// csrc/formulas.h in float32 (float64 for double), one block per example for the KL sum.
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

template <bool kPrior, typename S>
void launch_forward(const PosteriorArgs& a, double lo_, double hi_, at::Tensor& z, at::Tensor& kl) {
  using A = at::opmath_type<S>;
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = a.eps.const_data_ptr<S>();
  const S* mu_p = kPrior ? a.mu_p.const_data_ptr<S>() : nullptr;
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  S* zp = z.data_ptr<S>();
  const A lo = static_cast<A>(lo_), hi = static_cast<A>(hi_);
  cuda::row_sum<A>(a.B, a.M, kl.data_ptr<S>(), [=] __device__(int64_t, int64_t i) -> A {
    A zi, kli;
    const A mp = kPrior ? static_cast<A>(mu_p[i]) : A(0);
    const A lp = kPrior ? static_cast<A>(lv_p[i]) : A(0);
    math::posterior_forward<kPrior>(static_cast<A>(dmu[i]), static_cast<A>(dlv[i]),
                                    static_cast<A>(eps[i]), mp, lp, lo, hi, zi, kli);
    zp[i] = static_cast<S>(zi);
    return kli;
  });
}

std::tuple<at::Tensor, at::Tensor> posterior_sample_cuda(
    const at::Tensor& delta_mu, const at::Tensor& delta_logvar, const at::Tensor& eps,
    const c10::optional<at::Tensor>& mu_p, const c10::optional<at::Tensor>& logvar_p,
    double min_logvar, double max_logvar) {
  const c10::cuda::CUDAGuard guard(delta_mu.device());
  const PosteriorArgs a = prepare_posterior(delta_mu, delta_logvar, eps, mu_p, logvar_p, min_logvar, max_logvar, true);
  at::Tensor z = at::empty_like(a.dmu);
  at::Tensor kl = at::empty({a.B}, a.dmu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dmu.scalar_type(), "posterior_sample", [&] {
    if (a.prior) launch_forward<true, scalar_t>(a, min_logvar, max_logvar, z, kl);
    else launch_forward<false, scalar_t>(a, min_logvar, max_logvar, z, kl);
  });
  return {z, kl};
}

template <bool kPrior, typename S>
void launch_backward(const PosteriorArgs& a, const at::Tensor& gz_, const at::Tensor& gkl_, double lo_,
                     double hi_, at::Tensor& g_dmu, at::Tensor& g_dlv, at::Tensor& g_eps, at::Tensor& g_lvp) {
  using A = at::opmath_type<S>;
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = a.eps.const_data_ptr<S>();
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  const S* gz = gz_.const_data_ptr<S>();
  const S* gkl = gkl_.const_data_ptr<S>();
  S* o_dmu = g_dmu.data_ptr<S>();
  S* o_dlv = g_dlv.data_ptr<S>();
  S* o_eps = g_eps.data_ptr<S>();
  S* o_lvp = kPrior ? g_lvp.data_ptr<S>() : nullptr;
  const A lo = static_cast<A>(lo_), hi = static_cast<A>(hi_);
  const int64_t M = a.M;
  cuda::elementwise(a.B * M, [=] __device__(int64_t i) {
    A d_mu, d_lv, d_eps, d_lvp;
    const A lp = kPrior ? static_cast<A>(lv_p[i]) : A(0);
    math::posterior_backward<kPrior>(static_cast<A>(gz[i]), static_cast<A>(gkl[i / M]),
                                     static_cast<A>(dmu[i]), static_cast<A>(dlv[i]),
                                     static_cast<A>(eps[i]), lp, lo, hi, d_mu, d_lv, d_eps, d_lvp);
    o_dmu[i] = static_cast<S>(d_mu);
    o_dlv[i] = static_cast<S>(d_lv);
    o_eps[i] = static_cast<S>(d_eps);
    if (kPrior) o_lvp[i] = static_cast<S>(d_lvp);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> posterior_sample_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& delta_mu,
    const at::Tensor& delta_logvar, const at::Tensor& eps, const c10::optional<at::Tensor>& logvar_p,
    double min_logvar, double max_logvar) {
  const c10::cuda::CUDAGuard guard(delta_mu.device());
  const PosteriorArgs a = prepare_posterior(delta_mu, delta_logvar, eps, c10::nullopt, logvar_p, min_logvar, max_logvar, false);
  check_like(grad_z, a.dmu, "posterior_sample_backward", "grad_z", "delta_mu");
  check_grad_batch(grad_kl, a.B, a.dmu, "posterior_sample_backward");
  const at::Tensor gz = grad_z.contiguous(), gkl = grad_kl.to(a.dmu.scalar_type()).contiguous();
  at::Tensor g_dmu = at::empty_like(a.dmu), g_dlv = at::empty_like(a.dmu), g_eps = at::empty_like(a.dmu);
  at::Tensor g_lvp = a.prior ? at::empty_like(a.dmu) : at::empty({0}, a.dmu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dmu.scalar_type(), "posterior_sample_backward", [&] {
    if (a.prior) launch_backward<true, scalar_t>(a, gz, gkl, min_logvar, max_logvar, g_dmu, g_dlv, g_eps, g_lvp);
    else launch_backward<false, scalar_t>(a, gz, gkl, min_logvar, max_logvar, g_dmu, g_dlv, g_eps, g_lvp);
  });
  return {g_dmu, g_dlv, g_eps, g_lvp};
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("posterior_sample", &posterior_sample_cuda);
  m.impl("posterior_sample_backward", &posterior_sample_backward_cuda);
}

}  // namespace hvae_fast
