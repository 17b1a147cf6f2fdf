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
void launch_backward(PosteriorBackward& r, double lo_, double hi_) {
  using A = at::opmath_type<S>;
  const PosteriorArgs& a = r.a;
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = a.eps.const_data_ptr<S>();
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  const S* gz = r.gz.const_data_ptr<S>();
  const S* gkl = r.gkl.const_data_ptr<S>();
  S* o_dmu = r.g_dmu.data_ptr<S>();
  S* o_dlv = r.g_dlv.data_ptr<S>();
  S* o_eps = r.g_eps.data_ptr<S>();
  S* o_lvp = kPrior ? r.g_lvp.data_ptr<S>() : nullptr;
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
  PosteriorBackward r = prepare_posterior_backward(grad_z, grad_kl, delta_mu, delta_logvar, eps, logvar_p,
                                                   min_logvar, max_logvar);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.a.dmu.scalar_type(), "posterior_sample_backward", [&] {
    if (r.a.prior) launch_backward<true, scalar_t>(r, min_logvar, max_logvar);
    else launch_backward<false, scalar_t>(r, min_logvar, max_logvar);
  });
  return {r.g_dmu, r.g_dlv, r.g_eps, r.g_lvp};
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("posterior_sample", &posterior_sample_cuda);
  m.impl("posterior_sample_backward", &posterior_sample_backward_cuda);
}

}  // namespace hvae_fast
