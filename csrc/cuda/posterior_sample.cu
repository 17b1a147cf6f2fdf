// CUDA kernels of hvae_fast::posterior_sample, posterior_sample_philox and their
// backwards: the formulas of csrc/formulas.h in float32 (float64 for double), line by line
// as csrc/cpu/posterior_sample.cpp. The forward's per-example KL sum is cuda::row_sum's
// two-stage, fixed-order reduction; the backward takes each example's grad_kl from its
// block (cuda::for_rows), not from a division per element. With the noise drawn in the
// kernel, a thread takes one Philox counter and the four elements it gives
// (csrc/formulas.h has the layout).
//
// The in-kernel noise is that of the CPU kernels and of hvae_fast.reference.philox_normal
// to about 1.5e-6 in float32, not bit for bit: the Philox words and uniforms are the same
// bits, but CUDA's sinf/cosf/logf (full-range, about 2 ulp) round differently from the CPU's
// polynomials with their exact quarter-turn angle reduction (csrc/formulas.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <torch/library.h>

#include "../inputs.h"
#include "../formulas.h"
#include "launch.cuh"

namespace hvae_fast {
namespace {

// The seed is read on the host (csrc/inputs.h, philox_seed), so a captured CUDA graph would
// replay one noise on every replay: refuse capture, as hvae_fast.ops.posterior_sample does
// in eager mode (this also covers code compiled by torch.compile; its mode="reduce-overhead"
// keeps these ops out of its graphs, see the cudagraph_unsafe tag in csrc/hvae_fast.cpp).
void refuse_capture(const char* op) {
  TORCH_CHECK(at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None, op,
              " cannot be captured in a CUDA graph: its seed is read on the host, so every replay would draw the "
              "same noise. Pass eps (e.g. torch.randn_like(delta_mu)) to posterior_sample inside the graph instead");
}

// Philox counters per row: ceil(M / 64) blocks of 16.
int64_t counters_per_row(int64_t M) {
  return (M + math::kNoiseBlock - 1) / math::kNoiseBlock * math::kNoiseCounters;
}

// Calls f(i, eps_i) for the (up to) four elements of row b that Philox counter c of the
// row gives, i = b * M + j.
template <typename A, typename F>
__device__ inline void for_counter(uint64_t seed, int64_t b, int64_t c, int64_t M, int64_t per_row, const F& f) {
  uint32_t w[4];
  math::philox4x32_10(static_cast<uint64_t>(b * per_row + c), seed, w);
  A n[4];
  math::box_muller(math::uniform_from_bits<A>(w[0]), math::uniform_from_bits<A>(w[1]), n[0], n[1]);
  math::box_muller(math::uniform_from_bits<A>(w[2]), math::uniform_from_bits<A>(w[3]), n[2], n[3]);
  const int64_t base = (c / math::kNoiseCounters) * math::kNoiseBlock + c % math::kNoiseCounters;
#pragma unroll
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t j = base + lane * math::kNoiseCounters;
    if (j < M) f(b * M + j, n[lane]);
  }
}

template <bool kPrior, bool kPhilox, typename S>
void launch_forward(const PosteriorArgs& a, uint64_t seed, double lo_, double hi_, at::Tensor& z, at::Tensor& kl) {
  using A = at::opmath_type<S>;
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = kPhilox ? nullptr : a.eps.const_data_ptr<S>();
  const S* mu_p = kPrior ? a.mu_p.const_data_ptr<S>() : nullptr;
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  S* zp = z.data_ptr<S>();
  const A lo = static_cast<A>(lo_), hi = static_cast<A>(hi_);
  const int64_t M = a.M;
  auto element = [=] __device__(int64_t i, A e) -> A {
    A zi, kli;
    const A mp = kPrior ? static_cast<A>(mu_p[i]) : A(0);
    const A lp = kPrior ? static_cast<A>(lv_p[i]) : A(0);
    math::posterior_forward<kPrior>(static_cast<A>(dmu[i]), static_cast<A>(dlv[i]), e, mp, lp, lo, hi, zi, kli);
    zp[i] = static_cast<S>(zi);
    return kli;
  };
  if constexpr (kPhilox) {
    const int64_t per_row = counters_per_row(M);
    cuda::row_sum<A>(a.B, per_row, kl.data_ptr<S>(), z.device(), [=] __device__(int64_t b, int64_t i) -> A {
      A acc = 0;
      for_counter<A>(seed, b, i - b * per_row, M, per_row, [&](int64_t k, A e) { acc += element(k, e); });
      return acc;
    });
  } else {
    cuda::row_sum<A>(a.B, M, kl.data_ptr<S>(), z.device(), [=] __device__(int64_t, int64_t i) -> A {
      return element(i, static_cast<A>(eps[i]));
    });
  }
}

template <bool kPhilox>
std::tuple<at::Tensor, at::Tensor> forward(const PosteriorArgs& a, uint64_t seed, double lo, double hi) {
  at::Tensor z = at::empty_like(a.dmu);
  at::Tensor kl = at::empty({a.B}, a.dmu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dmu.scalar_type(), "posterior_sample", [&] {
    if (a.prior) launch_forward<true, kPhilox, scalar_t>(a, seed, lo, hi, z, kl);
    else launch_forward<false, kPhilox, scalar_t>(a, seed, lo, hi, z, kl);
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> posterior_sample_cuda(
    const at::Tensor& delta_mu, const at::Tensor& delta_logvar, const at::Tensor& eps,
    const c10::optional<at::Tensor>& mu_p, const c10::optional<at::Tensor>& logvar_p,
    double min_logvar, double max_logvar) {
  const c10::cuda::CUDAGuard guard(delta_mu.device());
  return forward<false>(prepare_posterior(delta_mu, delta_logvar, &eps, mu_p, logvar_p, min_logvar, max_logvar, true),
                        0, min_logvar, max_logvar);
}

std::tuple<at::Tensor, at::Tensor> posterior_sample_philox_cuda(
    const at::Tensor& delta_mu, const at::Tensor& delta_logvar, const c10::optional<at::Tensor>& mu_p,
    const c10::optional<at::Tensor>& logvar_p, const at::Tensor& seed, double min_logvar, double max_logvar) {
  constexpr const char* op = "posterior_sample_philox";
  const uint64_t key = philox_seed(seed, op);  // before the guard: a CPU delta_mu with a CUDA seed lands here
  const c10::cuda::CUDAGuard guard(delta_mu.device());
  refuse_capture(op);
  return forward<true>(prepare_posterior(delta_mu, delta_logvar, nullptr, mu_p, logvar_p, min_logvar, max_logvar, true),
                       key, min_logvar, max_logvar);
}

template <bool kPrior, bool kPhilox, typename S>
void launch_backward(PosteriorBackward& r, uint64_t seed, double lo_, double hi_) {
  using A = at::opmath_type<S>;
  const PosteriorArgs& a = r.a;
  const S* dmu = a.dmu.const_data_ptr<S>();
  const S* dlv = a.dlv.const_data_ptr<S>();
  const S* eps = kPhilox ? nullptr : a.eps.const_data_ptr<S>();
  const S* lv_p = kPrior ? a.lv_p.const_data_ptr<S>() : nullptr;
  const S* gz = r.gz.const_data_ptr<S>();
  const S* gkl = r.gkl.const_data_ptr<S>();
  S* o_dmu = r.g_dmu.data_ptr<S>();
  S* o_dlv = r.g_dlv.data_ptr<S>();
  S* o_eps = r.g_eps.numel() ? r.g_eps.data_ptr<S>() : nullptr;  // not wanted, or no eps
  S* o_lvp = kPrior ? r.g_lvp.data_ptr<S>() : nullptr;
  const A lo = static_cast<A>(lo_), hi = static_cast<A>(hi_);
  const int64_t M = a.M;
  // element i of example b, noise e
  auto element = [=] __device__(int64_t b, int64_t i, A e) {
    A d_mu, d_lv, d_eps, d_lvp;
    const A lp = kPrior ? static_cast<A>(lv_p[i]) : A(0);
    math::posterior_backward<kPrior>(static_cast<A>(gz[i]), static_cast<A>(gkl[b]), static_cast<A>(dmu[i]),
                                     static_cast<A>(dlv[i]), e, lp, lo, hi, d_mu, d_lv, d_eps, d_lvp);
    o_dmu[i] = static_cast<S>(d_mu);
    o_dlv[i] = static_cast<S>(d_lv);
    if (o_eps) o_eps[i] = static_cast<S>(d_eps);
    if (kPrior) o_lvp[i] = static_cast<S>(d_lvp);
  };
  if constexpr (kPhilox) {
    const int64_t per_row = counters_per_row(M);
    cuda::for_rows(a.B, per_row, [=] __device__(int64_t b, int64_t i) {
      for_counter<A>(seed, b, i - b * per_row, M, per_row, [&](int64_t k, A e) { element(b, k, e); });
    });
  } else {
    cuda::for_rows(a.B, M, [=] __device__(int64_t b, int64_t i) { element(b, i, static_cast<A>(eps[i])); });
  }
}

template <bool kPhilox>
void backward(PosteriorBackward& r, uint64_t seed, double lo, double hi) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.a.dmu.scalar_type(), "posterior_sample_backward", [&] {
    if (r.a.prior) launch_backward<true, kPhilox, scalar_t>(r, seed, lo, hi);
    else launch_backward<false, kPhilox, scalar_t>(r, seed, lo, hi);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> posterior_sample_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& delta_mu,
    const at::Tensor& delta_logvar, const at::Tensor& eps, const c10::optional<at::Tensor>& logvar_p,
    double min_logvar, double max_logvar, bool eps_grad) {
  const c10::cuda::CUDAGuard guard(delta_mu.device());
  PosteriorBackward r = prepare_posterior_backward(grad_z, grad_kl, delta_mu, delta_logvar, &eps, logvar_p,
                                                   min_logvar, max_logvar, eps_grad);
  backward<false>(r, 0, min_logvar, max_logvar);
  return {r.g_dmu, r.g_dlv, r.g_eps, r.g_lvp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> posterior_sample_philox_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& delta_mu,
    const at::Tensor& delta_logvar, const c10::optional<at::Tensor>& logvar_p, const at::Tensor& seed,
    double min_logvar, double max_logvar) {
  constexpr const char* op = "posterior_sample_philox_backward";
  const uint64_t key = philox_seed(seed, op);
  const c10::cuda::CUDAGuard guard(delta_mu.device());
  refuse_capture(op);
  PosteriorBackward r = prepare_posterior_backward(grad_z, grad_kl, delta_mu, delta_logvar, nullptr, logvar_p,
                                                   min_logvar, max_logvar);
  backward<true>(r, key, min_logvar, max_logvar);
  return {r.g_dmu, r.g_dlv, r.g_lvp};
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("posterior_sample", &posterior_sample_cuda);
  m.impl("posterior_sample_backward", &posterior_sample_backward_cuda);
  m.impl("posterior_sample_philox", &posterior_sample_philox_cuda);
  m.impl("posterior_sample_philox_backward", &posterior_sample_philox_backward_cuda);
}

}  // namespace hvae_fast
