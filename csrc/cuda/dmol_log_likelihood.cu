// CUDA kernels of hvae_fast::dmol_log_likelihood and its backward, through the per-pixel
// maths of csrc/formulas.h that the CPU kernels run (math::dmol_log_prob, math::dmol_grad):
// one thread per pixel, in float32 for half-precision params (at::opmath_type). The forward
// writes each pixel's log-probability (float32) and sums them per example with
// cuda::row_sum's fixed-order reduction: bit-deterministic. A pixel value out of 0..K-1 is a
// device-side assert (the CUDA context is unusable afterwards), where the CPU raises a
// catchable ValueError.
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

template <typename A>
math::DmolConsts<A> consts(const DmolArgs& a, double min_log_scale) {
  return {A(a.K - 1), A(min_log_scale), A(1.0 / double(a.K - 1)), A(2.0 / double(a.K - 1))};
}

// Pixel i (flat over B * H * W) of example b = i / HW: its parameters and pixel values.
template <typename S, typename I, typename A>
struct Pixel {
  const S* params;  // channel 0 of this pixel
  const I* x;       // channel 0 of this pixel
  int64_t HW, K;

  __device__ A param(int64_t p) const { return static_cast<A>(params[p * HW]); }
  // as int32: check() has asserted 0 <= v < K <= 2^24
  __device__ A value(int64_t c) const { return static_cast<A>(static_cast<int32_t>(x[c * HW])); }
  // Once per pixel, before the maths (one assert site: asserts in the loops cost registers).
  __device__ void check(int64_t C) const {
    bool ok = true;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t v = static_cast<int64_t>(x[c * HW]);
      ok &= (v >= 0) & (v < K);
    }
    CUDA_KERNEL_ASSERT(ok && "dmol_log_likelihood: x holds a value out of 0..num_vals-1");
  }
};

template <typename S, typename I, typename A>
__device__ Pixel<S, I, A> pixel(const S* pp, const I* xp, int64_t i, int64_t HW, int64_t P, int64_t C, int64_t K) {
  const int64_t b = i / HW, j = i - b * HW;
  return {pp + b * P * HW + j, xp + b * C * HW + j, HW, K};
}

template <typename S, typename I>
void launch_forward(const DmolArgs& a, double min_log_scale, at::Tensor& ll) {
  using A = at::opmath_type<S>;
  const S* pp = a.params.const_data_ptr<S>();
  const I* xp = a.x.const_data_ptr<I>();
  const int64_t HW = a.H * a.W, P = a.P, C = a.C, M = a.M, K = a.K;
  const math::DmolConsts<A> k = consts<A>(a, min_log_scale);
  at::Tensor pixel_ll = at::empty({a.B * HW}, a.params.options().dtype(c10::CppTypeToScalarType<A>::value));
  A* out = pixel_ll.data_ptr<A>();
  // float64: at least 2 blocks of 256 per multiprocessor in the launch bounds, where the block size
  // alone let ptxas hold the kernel to 64 registers and spill 60 bytes around its calls (the assert,
  // the int64 and float64 divisions' slow paths); with the bound it takes 78 and spills none
  // (3 blocks per multiprocessor instead of 4). The other types take 40 registers either way.
  constexpr int kMinBlocks = std::is_same<A, double>::value ? 2 : 0;
  cuda::elementwise<kMinBlocks>(a.B * HW, [=] __device__(int64_t i) {
    const auto px = pixel<S, I, A>(pp, xp, i, HW, P, C, K);
    px.check(C);
    const auto param = [&](int64_t p) { return px.param(p); };
    out[i] = math::dmol_log_prob(param, [&](int64_t p) { return math::tanh_(px.param(p)); },
                                 [&](int64_t c) { return px.value(c); },
                                 [&](int64_t c) { return math::dmol_scaled(px.value(c), k.K1); }, M, C, k);
  });
  cuda::row_sum<A>(a.B, HW, ll.data_ptr<S>(), ll.device(), [=] __device__(int64_t, int64_t i) -> A { return out[i]; });
}

template <typename S, typename I>
void launch_backward(const at::Tensor& grad, const DmolArgs& a, double min_log_scale, at::Tensor& gout) {
  using A = at::opmath_type<S>;
  const S* pp = a.params.const_data_ptr<S>();
  const I* xp = a.x.const_data_ptr<I>();
  const A* g = grad.const_data_ptr<A>();
  S* o = gout.data_ptr<S>();
  const int64_t HW = a.H * a.W, P = a.P, C = a.C, M = a.M, K = a.K;
  const math::DmolConsts<A> k = consts<A>(a, min_log_scale);
  cuda::elementwise(a.B * HW, [=] __device__(int64_t i) {
    const auto px = pixel<S, I, A>(pp, xp, i, HW, P, C, K);
    px.check(C);
    const int64_t b = i / HW;
    S* orow = o + (px.params - pp);  // this pixel's channel 0 in the gradient
    const auto param = [&](int64_t p) { return px.param(p); };
    const auto tanh_at = [&](int64_t p) { return math::tanh_(px.param(p)); };
    const auto value = [&](int64_t c) { return px.value(c); };
    const auto scaled = [&](int64_t c) { return math::dmol_scaled(px.value(c), k.K1); };
    const auto pix = math::dmol_pixel(param, tanh_at, value, scaled, M, C, k, [](int64_t, A) {});
    // each component again where the CPU keeps them: an array of M would live in local memory
    const auto comp = [&](int64_t m) {
      return math::dmol_component(param, tanh_at, value, scaled, M, C, m, pix.lmax, pix.log_s, k);
    };
    math::dmol_grad(g[b], param, tanh_at, value, scaled, M, C, k, pix, comp,
                    [&](int64_t p, A v) { orow[p * HW] = static_cast<S>(v); });
  });
}

template <typename F>
void dispatch_pixels(const at::Tensor& x, const F& f) {
  if (x.scalar_type() == at::kByte) return f(uint8_t{});
  return f(int64_t{});
}

at::Tensor dmol_log_likelihood_cuda(const at::Tensor& params_, const at::Tensor& x_, int64_t num_mixtures,
                                    int64_t num_vals, double min_log_scale) {
  constexpr const char* op = "dmol_log_likelihood";
  const c10::cuda::CUDAGuard guard(params_.device());
  const DmolArgs a = prepare_dmol(params_, x_, num_mixtures, num_vals, op);
  at::Tensor ll = at::empty({a.B}, a.params.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.params.scalar_type(), op, [&] {
    dispatch_pixels(a.x, [&](auto i) { launch_forward<scalar_t, decltype(i)>(a, min_log_scale, ll); });
  });
  return ll;
}

at::Tensor dmol_log_likelihood_backward_cuda(const at::Tensor& grad, const at::Tensor& params_, const at::Tensor& x_,
                                             int64_t num_mixtures, int64_t num_vals, double min_log_scale) {
  constexpr const char* op = "dmol_log_likelihood_backward";
  const c10::cuda::CUDAGuard guard(params_.device());
  const DmolArgs a = prepare_dmol(params_, x_, num_mixtures, num_vals, op);
  check_grad_batch(grad, a.B, a.params, op);
  const at::Tensor g = grad.to(at::toOpMathType(a.params.scalar_type())).contiguous();
  at::Tensor out = at::empty_like(a.params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.params.scalar_type(), op, [&] {
    dispatch_pixels(a.x, [&](auto i) { launch_backward<scalar_t, decltype(i)>(g, a, min_log_scale, out); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("dmol_log_likelihood", &dmol_log_likelihood_cuda);
  m.impl("dmol_log_likelihood_backward", &dmol_log_likelihood_backward_cuda);
}

}  // namespace hvae_fast
