// CPU kernels of hvae_fast::dmol_log_likelihood and its backward: SIMD vectors over the
// pixels of one example (params [B, P, H, W] hold each parameter channel's pixels
// contiguously), the per-pixel maths of csrc/formulas.h (math::dmol_log_prob; math::dmol_pixel, which keeps
// each component's value, then math::dmol_grad).
// Each task takes kChunk pixels of one example; the forward adds the chunks' sums in chunk
// order (cpu::row_sum), so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <vector>

#include "../inputs.h"
#include "../formulas.h"
#include "kernels.h"
#include "vec.h"

namespace hvae_fast {
namespace cpu {
inline namespace HVAE_FAST_CPU_LEVEL {
namespace {

constexpr int64_t kChunk = 256;  // pixels per task

// Pixels [begin, end) of example b: each channel's values v and scaled x as S, [C][n].
// Names the first value out of 0..K-1 and where it is.
template <typename S>
struct PixelValues {
  std::vector<S> v, x;
  int64_t n;

  template <typename I>
  PixelValues(const I* xp, const DmolArgs& a, int64_t b, int64_t begin, int64_t end, const char* op)
      : v(a.C * (end - begin)), x(a.C * (end - begin)), n(end - begin) {
    const int64_t HW = a.H * a.W;
    const S K1 = S(a.K - 1);
    for (int64_t c = 0; c < a.C; ++c) {
      const I* row = xp + (b * a.C + c) * HW;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t val = static_cast<int64_t>(row[i]);
        TORCH_CHECK_VALUE(val >= 0 && val < a.K, op, ": x holds ", val, " at [", b, ", ", c, ", ", i / a.W, ", ",
                          i % a.W, "], which is not a pixel value in 0..", a.K - 1, " (num_vals = ", a.K, ")");
        v[c * n + i - begin] = S(val);
        x[c * n + i - begin] = math::dmol_scaled(S(val), K1);
      }
    }
  }
};

template <typename S>
math::DmolConsts<S> consts(const DmolArgs& a, double min_log_scale) {
  return {S(a.K - 1), S(min_log_scale), S(1.0 / double(a.K - 1)), S(2.0 / double(a.K - 1))};
}

template <typename V, typename S>
math::DmolConsts<V> as_vec(const math::DmolConsts<S>& k) {
  return {V(k.K1), V(k.lo), V(k.h), V(k.two_h)};
}

// Calls f(x's data pointer) for uint8 or int64 pixel values.
template <typename F>
void dispatch_pixels(const at::Tensor& x, const F& f) {
  if (x.scalar_type() == at::kByte) return f(x.const_data_ptr<uint8_t>());
  return f(x.const_data_ptr<int64_t>());
}

// tanh of the coupling coefficients' channels [first, P) at the pixels of one vector, each
// taken once (the means of every channel and the backward use them again).
template <typename S>
struct Tanhs {
  static constexpr int64_t VS = at::vec::Vectorized<S>::size();
  int64_t first;
  std::vector<S> buf;
  explicit Tanhs(const DmolArgs& a) : first(a.M + 2 * a.C * a.M), buf((a.P - first) * VS) {}

  // Fills the buffer from param, returns tanh_at(p) for the formulas.
  template <typename Param, typename V>
  auto at(const Param& param, V zero) {
    for (int64_t p = first; p < first + int64_t(buf.size()) / VS; ++p)
      cpu::store(buf.data() + (p - first) * VS, math::tanh_(param(p)));
    return [this, zero](int64_t p) { return cpu::load(buf.data() + (p - first) * VS, zero); };
  }
};

// Work of one pixel in units of a copy: about 5 transcendental functions per channel and component.
int64_t pixel_cost(const DmolArgs& a) { return std::max<int64_t>(1, 40 * a.M * a.C); }

at::Tensor dmol_log_likelihood_cpu(const at::Tensor& params_, const at::Tensor& x_, int64_t num_mixtures,
                                   int64_t num_vals, double min_log_scale) {
  constexpr const char* op = "dmol_log_likelihood";
  const DmolArgs a = prepare_dmol(params_, x_, num_mixtures, num_vals, op);
  const int64_t HW = a.H * a.W;
  at::Tensor ll = at::empty({a.B}, a.params.options());
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), op, [&] {
    using S = scalar_t;
    const S* pp = a.params.const_data_ptr<S>();
    const auto k = consts<S>(a, min_log_scale);
    dispatch_pixels(a.x, [&](const auto* xp) {
      cpu::row_sum<S>(a.B, HW, kChunk, pixel_cost(a), ll.data_ptr<S>(), [&](int64_t b, int64_t begin, int64_t end) {
        const PixelValues<S> px(xp, a, b, begin, end, op);
        const S* pr = pp + b * a.P * HW;
        cpu::SumAcc<S> acc;
        Tanhs<S> tanhs(a);
        cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
          using V = decltype(zero);
          const int64_t j = i - begin;
          const auto param = [&](int64_t p) { return cpu::load(pr + p * HW + i, zero); };
          const auto value = [&](int64_t c) { return cpu::load(px.v.data() + c * px.n + j, zero); };
          const auto scaled = [&](int64_t c) { return cpu::load(px.x.data() + c * px.n + j, zero); };
          acc.add(math::dmol_log_prob(param, tanhs.at(param, zero), value, scaled, a.M, a.C, as_vec<V>(k)));
        });
        return acc.total();
      });
    });
  });
  return ll;
}

at::Tensor dmol_log_likelihood_backward_cpu(const at::Tensor& grad, const at::Tensor& params_, const at::Tensor& x_,
                                            int64_t num_mixtures, int64_t num_vals, double min_log_scale) {
  constexpr const char* op = "dmol_log_likelihood_backward";
  const DmolArgs a = prepare_dmol(params_, x_, num_mixtures, num_vals, op);
  check_grad_batch(grad, a.B, a.params, op);
  const int64_t HW = a.H * a.W;
  const at::Tensor g = grad.to(a.params.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(a.params);
  cpu::huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), op, [&] {
    using S = scalar_t;
    const S* pp = a.params.const_data_ptr<S>();
    const S* gp = g.const_data_ptr<S>();
    S* o = out.data_ptr<S>();
    const auto k = consts<S>(a, min_log_scale);
    dispatch_pixels(a.x, [&](const auto* xp) {
      cpu::for_row_chunks(a.B, HW, kChunk, pixel_cost(a), [&](int64_t b, int64_t fbegin, int64_t fend) {
        const int64_t begin = fbegin - b * HW, end = fend - b * HW;
        const PixelValues<S> px(xp, a, b, begin, end, op);
        const S* pr = pp + b * a.P * HW;
        S* orow = o + b * a.P * HW;
        constexpr int64_t VS = at::vec::Vectorized<S>::size();
        std::vector<S> comps(a.M * VS);  // each component's value at the pixels of one vector
        Tanhs<S> tanhs(a);
        cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
          using V = decltype(zero);
          const int64_t j = i - begin;
          const auto param = [&](int64_t p) { return cpu::load(pr + p * HW + i, zero); };
          const auto value = [&](int64_t c) { return cpu::load(px.v.data() + c * px.n + j, zero); };
          const auto scaled = [&](int64_t c) { return cpu::load(px.x.data() + c * px.n + j, zero); };
          const auto put = [&](int64_t p, const V& val) { cpu::store(orow + p * HW + i, val); };
          const auto kv = as_vec<V>(k);
          const auto tanh_at = tanhs.at(param, zero);
          const auto pix = math::dmol_pixel(param, tanh_at, value, scaled, a.M, a.C, kv,
                                            [&](int64_t m, const V& c) { cpu::store(comps.data() + m * VS, c); });
          math::dmol_grad(V(gp[b]), param, tanh_at, value, scaled, a.M, a.C, kv, pix,
                          [&](int64_t m) { return cpu::load(comps.data() + m * VS, zero); }, put);
        });
      });
    });
  });
  return out;
}

}  // namespace

HVAE_FAST_CPU_KERNELS(HVAE_FAST_DECLARE_KERNEL)
HVAE_FAST_EXPORT_KERNEL(dmol_log_likelihood, dmol_log_likelihood_cpu)
HVAE_FAST_EXPORT_KERNEL(dmol_log_likelihood_backward, dmol_log_likelihood_backward_cpu)
}  // namespace HVAE_FAST_CPU_LEVEL
}  // namespace cpu

}  // namespace hvae_fast
