// CPU kernels of hvae_fast::posterior_sample, posterior_sample_philox (the noise drawn
// in the kernel, csrc/cpu/noise.h) and their backwards.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "../inputs.h"
#include "../formulas.h"
#include "noise.h"
#include "kernels.h"
#include "vec.h"

namespace hvae_fast {
namespace cpu {
inline namespace HVAE_FAST_CPU_LEVEL {
namespace {

constexpr int64_t kChunk = 4096;  // a multiple of the noise block
static_assert(kChunk % math::kNoiseBlock == 0, "chunks hold whole noise blocks");

// Runs f(i, eps_i) over elements [begin, end) of row b (row-relative indices), where
// eps_i is a vector or scalar of the noise: read from `eps`, or drawn (kPhilox).
template <bool kPhilox, typename S, typename F>
void with_noise(const S* eps, uint64_t seed, int64_t b, int64_t M, int64_t begin, int64_t end, const F& f) {
  const int64_t off = b * M;
  if constexpr (!kPhilox) {
    cpu::vec_for<S>(off + begin, off + end, [&](int64_t i, auto zero) { f(i, cpu::load(eps + i, zero)); });
  } else {
    const int64_t nb = (M + math::kNoiseBlock - 1) / math::kNoiseBlock;
    alignas(64) S noise[math::kNoiseBlock];
    for (int64_t j0 = begin; j0 < end; j0 += math::kNoiseBlock) {
      const uint64_t first = static_cast<uint64_t>(b * nb + j0 / math::kNoiseBlock) * math::kNoiseCounters;
      cpu::philox_normal_block<S>(seed, first, noise);
      const int64_t j1 = std::min(end, j0 + math::kNoiseBlock);
      cpu::vec_for<S>(off + j0, off + j1, [&](int64_t i, auto zero) {
        f(i, cpu::load(noise + (i - off - j0), zero));
      });
    }
  }
}

template <bool kPrior, bool kPhilox, typename S>
void forward_kernel(const PosteriorArgs& a, uint64_t seed, double lo_, double hi_, S* z, S* kl) {
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = kPhilox ? nullptr : a.eps.const_data_ptr<S>();
  const S* mu_p = kPrior ? a.mu_p.const_data_ptr<S>() : nullptr;
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  const int64_t M = a.M;
  cpu::row_sum<S>(a.B, M, kChunk, kPhilox ? 12 : 4, kl, [&](int64_t b, int64_t begin, int64_t end) {
    cpu::SumAcc<S> acc;
    with_noise<kPhilox>(eps, seed, b, M, begin, end, [&](int64_t i, auto e) {
      using V = decltype(e);
      const V zero(S(0)), lo(static_cast<S>(lo_)), hi(static_cast<S>(hi_));
      V zi, kli;
      const V mp = kPrior ? cpu::load(mu_p + i, zero) : zero;
      const V lp = kPrior ? cpu::load(lv_p + i, zero) : zero;
      math::posterior_forward<kPrior>(cpu::load(dmu + i, zero), cpu::load(dlv + i, zero), e, mp, lp, lo, hi,
                                      zi, kli);
      cpu::store(z + i, zi);
      acc.add(kli);
    });
    return acc.total();
  });
}

template <bool kPhilox>
std::tuple<at::Tensor, at::Tensor> forward(const PosteriorArgs& a, uint64_t seed, double lo, double hi) {
  at::Tensor z = at::empty_like(a.dmu);
  cpu::huge_pages(z);
  at::Tensor kl = at::empty({a.B}, a.dmu.options());
  AT_DISPATCH_FLOATING_TYPES(a.dmu.scalar_type(), "posterior_sample", [&] {
    auto run = [&](auto prior) {
      forward_kernel<decltype(prior)::value, kPhilox, scalar_t>(a, seed, lo, hi, z.data_ptr<scalar_t>(),
                                                               kl.data_ptr<scalar_t>());
    };
    if (a.prior) run(std::true_type{}); else run(std::false_type{});
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> posterior_sample_cpu(
    const at::Tensor& delta_mu, const at::Tensor& delta_logvar, const at::Tensor& eps,
    const c10::optional<at::Tensor>& mu_p, const c10::optional<at::Tensor>& logvar_p,
    double min_logvar, double max_logvar) {
  return forward<false>(prepare_posterior(delta_mu, delta_logvar, &eps, mu_p, logvar_p, min_logvar, max_logvar, true),
                        0, min_logvar, max_logvar);
}

std::tuple<at::Tensor, at::Tensor> posterior_sample_philox_cpu(
    const at::Tensor& delta_mu, const at::Tensor& delta_logvar, const c10::optional<at::Tensor>& mu_p,
    const c10::optional<at::Tensor>& logvar_p, const at::Tensor& seed, double min_logvar, double max_logvar) {
  const uint64_t key = philox_seed(seed, "posterior_sample_philox");
  return forward<true>(prepare_posterior(delta_mu, delta_logvar, nullptr, mu_p, logvar_p, min_logvar, max_logvar, true),
                       key, min_logvar, max_logvar);
}

template <bool kPrior, bool kPhilox, typename S>
void backward_kernel(const PosteriorBackward& r, uint64_t seed, double lo_, double hi_) {
  const PosteriorArgs& a = r.a;
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = kPhilox ? nullptr : a.eps.const_data_ptr<S>();
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  const S* gz = r.gz.const_data_ptr<S>();
  const S* gkl = r.gkl.const_data_ptr<S>();
  S* g_dmu = r.g_dmu.data_ptr<S>();
  S* g_dlv = r.g_dlv.data_ptr<S>();
  S* g_eps = r.g_eps.numel() ? r.g_eps.data_ptr<S>() : nullptr;  // not wanted, or no eps
  S* g_lvp = kPrior ? r.g_lvp.data_ptr<S>() : nullptr;
  const int64_t M = a.M;
  cpu::for_row_chunks(a.B, M, kChunk, kPhilox ? 14 : 6, [&](int64_t b, int64_t begin, int64_t end) {
    const int64_t off = b * M;
    with_noise<kPhilox>(eps, seed, b, M, begin - off, end - off, [&](int64_t i, auto e) {
      using V = decltype(e);
      const V zero(S(0)), lo(static_cast<S>(lo_)), hi(static_cast<S>(hi_)), gk(gkl[b]);
      V d_mu, d_lv, d_eps, d_lvp;
      const V lp = kPrior ? cpu::load(lv_p + i, zero) : zero;
      math::posterior_backward<kPrior>(cpu::load(gz + i, zero), gk, cpu::load(dmu + i, zero),
                                       cpu::load(dlv + i, zero), e, lp, lo, hi, d_mu, d_lv, d_eps, d_lvp);
      cpu::store(g_dmu + i, d_mu);
      cpu::store(g_dlv + i, d_lv);
      if (g_eps) cpu::store(g_eps + i, d_eps);
      if (kPrior) cpu::store(g_lvp + i, d_lvp);
    });
  });
}

template <bool kPhilox>
void backward(const PosteriorBackward& r, uint64_t seed, double lo, double hi) {
  for (const at::Tensor* t : {&r.g_dmu, &r.g_dlv, &r.g_eps, &r.g_lvp}) cpu::huge_pages(*t);
  AT_DISPATCH_FLOATING_TYPES(r.a.dmu.scalar_type(), "posterior_sample_backward", [&] {
    auto run = [&](auto prior) { backward_kernel<decltype(prior)::value, kPhilox, scalar_t>(r, seed, lo, hi); };
    if (r.a.prior) run(std::true_type{}); else run(std::false_type{});
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> posterior_sample_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& delta_mu,
    const at::Tensor& delta_logvar, const at::Tensor& eps, const c10::optional<at::Tensor>& logvar_p,
    double min_logvar, double max_logvar, bool eps_grad) {
  PosteriorBackward r = prepare_posterior_backward(grad_z, grad_kl, delta_mu, delta_logvar, &eps, logvar_p,
                                                   min_logvar, max_logvar, eps_grad);
  backward<false>(r, 0, min_logvar, max_logvar);
  return {r.g_dmu, r.g_dlv, r.g_eps, r.g_lvp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> posterior_sample_philox_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& delta_mu,
    const at::Tensor& delta_logvar, const c10::optional<at::Tensor>& logvar_p, const at::Tensor& seed,
    double min_logvar, double max_logvar) {
  const uint64_t key = philox_seed(seed, "posterior_sample_philox_backward");
  PosteriorBackward r = prepare_posterior_backward(grad_z, grad_kl, delta_mu, delta_logvar, nullptr, logvar_p,
                                                   min_logvar, max_logvar);
  backward<true>(r, key, min_logvar, max_logvar);
  return {r.g_dmu, r.g_dlv, r.g_lvp};
}

}  // namespace

HVAE_FAST_CPU_KERNELS(HVAE_FAST_DECLARE_KERNEL)
HVAE_FAST_EXPORT_KERNEL(posterior_sample, posterior_sample_cpu)
HVAE_FAST_EXPORT_KERNEL(posterior_sample_backward, posterior_sample_backward_cpu)
HVAE_FAST_EXPORT_KERNEL(posterior_sample_philox, posterior_sample_philox_cpu)
HVAE_FAST_EXPORT_KERNEL(posterior_sample_philox_backward, posterior_sample_philox_backward_cpu)
}  // namespace HVAE_FAST_CPU_LEVEL
}  // namespace cpu

}  // namespace hvae_fast
