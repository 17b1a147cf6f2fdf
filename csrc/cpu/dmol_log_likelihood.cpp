// CPU kernels of hvae_fast::dmol_log_likelihood and its backward, through the per-pixel maths of
// csrc/formulas.h (math::dmol_logits, dmol_component, dmol_lse_kept, dmol_grad_component).
// params [B, P, H, W] hold each parameter channel's pixels contiguously. Each task takes kChunk
// pixels of one example and runs over them in passes, SIMD vectors over the pixels in each:
// the logits' log-softmax shift; then component by component, each component's value (and in
// the backward its gradient), kept in the task's scratch memory; the log-sum-exp in between.
// A pass reads the 1 + 2C + C(C-1)/2 channels of one component (10 at C = 3), each in order.
// (Pixel by pixel, each vector read one cache line from each of the P rows, 100 at C = 3, M = 10,
// 4 KiB apart at 32x32 float: more streams than the hardware prefetchers follow, all in one L1
// set, so the loads waited on memory.)
// The forward adds the chunks' sums in chunk order (cpu::row_sum_with), so the result does not
// depend on the thread count.
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
// Each pass asks for the cache lines of its channels kAhead pixels on (the next chunk's), and the
// gradient pass for those of its outputs: the hardware prefetchers follow the 1 + 2C + C(C-1)/2
// rows of a pass for a few lines only, and the first access to each line waited on memory
// (when added, rgb32 at 1 thread: forward 9 -> 5 ms, backward 13 -> 8 ms with the reads' prefetch,
// -> 6.5 with the writes').
constexpr int64_t kAhead = kChunk;

// The scratch memory of one thread, for one task at a time: pixels [begin, end) of example b,
// n = end - begin <= N, each an array [N] (so that a vector's lanes are contiguous):
//   v, x [C]: each channel's pixel value and its dmol_scaled x, as S
//   lmax, log_s: the logits' log-softmax shift (dmol_logits); lse: log p(x) (backward)
//   comps [M]: each component's value
//   tanhs [P - first]: tanh of the coupling coefficients' channels, in a pass of their own (the
//   backward's means and gradients take each twice)
//   backward only: bins [M][C][4]: inv, ea, eb, em of each component and channel from dmol_bin,
//   so that the gradient pass takes no transcendental function per channel.
template <typename S>
struct Scratch {
  int64_t N, first, HW, P;
  std::vector<S> buf;
  const S* pr = nullptr;  // the params of this chunk's example
  bool last = false;      // the batch's last example
  S *v, *x, *lmax, *log_s, *lse, *comps, *tanhs, *bins;

  Scratch(const DmolArgs& a, bool backward)
      : N(std::min(kChunk, a.H * a.W)), first(a.M + 2 * a.C * a.M), HW(a.H * a.W), P(a.P),
        buf(N * (2 * a.C + 3 + a.M + (a.P - first) + (backward ? 4 * a.M * a.C : 0))) {
    v = buf.data();
    x = v + a.C * N;
    lmax = x + a.C * N;
    log_s = lmax + N;
    lse = log_s + N;
    comps = lse + N;
    tanhs = comps + a.M * N;
    bins = tanhs + (a.P - first) * N;
  }

  // Where the params of pixel i will be kAhead pixels on, in the order of (example, pixel) that
  // the tasks take: this example's row or the next one's; nullptr past the batch.
  const S* ahead(int64_t i) const {
    const int64_t t = i + kAhead;
    return t < HW ? pr + t : last || t - HW >= HW ? nullptr : pr + P * HW + (t - HW);
  }

  // Starts a task: pixels [begin, end) of example b, params pp. Reads the pixel values, checked,
  // and takes tanh of the coefficients' channels.
  template <typename I>
  void start(const S* pp, const I* xp, const DmolArgs& a, int64_t b, int64_t begin, int64_t end, const char* op) {
    pr = pp + b * P * HW;
    last = b + 1 == a.B;
    const S K1 = S(a.K - 1);
    for (int64_t c = 0; c < a.C; ++c) {
      const I* row = xp + (b * a.C + c) * HW;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t val = static_cast<int64_t>(row[i]);
        TORCH_CHECK_VALUE(val >= 0 && val < a.K, op, ": x holds ", val, " at [", b, ", ", c, ", ", i / a.W, ", ",
                          i % a.W, "], which is not a pixel value in 0..", a.K - 1, " (num_vals = ", a.K, ")");
        v[c * N + i - begin] = S(val);
        x[c * N + i - begin] = math::dmol_scaled(S(val), K1);
      }
    }
    for (int64_t p = first; p < P; ++p) {
      cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
        if constexpr (!std::is_same<decltype(zero), S>::value) {
          if (const S* next = ahead(i)) __builtin_prefetch(next + p * HW);
        }
        cpu::store(tanhs + (p - first) * N + i - begin, math::tanh_any_(cpu::load(pr + p * HW + i, zero)));
      });
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

// Work of one pixel in units of a copy: about 5 transcendental functions per channel and component.
int64_t pixel_cost(const DmolArgs& a) { return std::max<int64_t>(1, 40 * a.M * a.C); }

// The accessors of one vector (or, in the tail, one pixel) at pixel i, the j-th of its chunk:
// param(p) reads parameter channel p (and asks for its line kAhead pixels on), value(c) and
// scaled(c) the pixel's channel c, at(buffer) a scratch array [N] at this pixel.
template <typename S, typename V>
struct At {
  const Scratch<S>& sc;
  int64_t i, j;
  V zero;
  const S* next;
  At(const Scratch<S>& sc, int64_t i, int64_t begin, V zero)
      : sc(sc), i(i), j(i - begin), zero(zero), next(std::is_same<V, S>::value ? nullptr : sc.ahead(i)) {}
  V param(int64_t p) const {
    if (next) __builtin_prefetch(next + p * sc.HW);
    return cpu::load(sc.pr + p * sc.HW + i, zero);
  }
  V at(const S* buffer) const { return cpu::load(buffer + j, zero); }
  V value(int64_t c) const { return at(sc.v + c * sc.N); }
  V scaled(int64_t c) const { return at(sc.x + c * sc.N); }
  V tanh_at(int64_t p) const { return at(sc.tanhs + (p - sc.first) * sc.N); }
};

// The passes both kernels take over a chunk [begin, end): the logits' shift (lmax, log_s), then
// each component's value (comps), keeping its channels' exponentials (bins) if kKeepBins.
template <bool kKeepBins, typename S>
void component_passes(Scratch<S>& sc, const math::DmolConsts<S>& k, int64_t M, int64_t C, int64_t begin,
                      int64_t end) {
  const int64_t N = sc.N;
  cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
    using V = decltype(zero);
    const At<S, V> px(sc, i, begin, zero);
    V lmax = zero, log_s = zero;
    math::dmol_logits([&](int64_t p) { return px.param(p); }, M, lmax, log_s);
    cpu::store(sc.lmax + px.j, lmax);
    cpu::store(sc.log_s + px.j, log_s);
  });
  for (int64_t m = 0; m < M; ++m) {
    cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
      using V = decltype(zero);
      const At<S, V> px(sc, i, begin, zero);
      const auto keep_bin = [&](int64_t m, int64_t c, const math::DmolBin<V>& q) {
        if constexpr (kKeepBins) {
          S* kept = sc.bins + (m * C + c) * 4 * N + px.j;
          cpu::store(kept, q.inv);
          cpu::store(kept + N, q.ea);
          cpu::store(kept + 2 * N, q.eb);
          cpu::store(kept + 3 * N, q.em);
        }
      };
      cpu::store(sc.comps + m * N + px.j,
                 math::dmol_component([&](int64_t p) { return px.param(p); }, [&](int64_t p) { return px.tanh_at(p); },
                                      [&](int64_t c) { return px.value(c); }, [&](int64_t c) { return px.scaled(c); },
                                      M, C, m, px.at(sc.lmax), px.at(sc.log_s), as_vec<V>(k), keep_bin));
    });
  }
}

at::Tensor dmol_log_likelihood_cpu(const at::Tensor& params_, const at::Tensor& x_, int64_t num_mixtures,
                                   int64_t num_vals, double min_log_scale) {
  constexpr const char* op = "dmol_log_likelihood";
  const DmolArgs a = prepare_dmol(params_, x_, num_mixtures, num_vals, op);
  const int64_t HW = a.H * a.W, M = a.M, C = a.C;
  at::Tensor ll = at::empty({a.B}, a.params.options());
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), op, [&] {
    using S = scalar_t;
    const S* pp = a.params.const_data_ptr<S>();
    const auto k = consts<S>(a, min_log_scale);
    dispatch_pixels(a.x, [&](const auto* xp) {
      const auto make = [&] { return Scratch<S>(a, false); };
      const auto chunk_sum = [&](Scratch<S>& sc, int64_t b, int64_t begin, int64_t end) {
        sc.start(pp, xp, a, b, begin, end, op);
        component_passes<false>(sc, k, M, C, begin, end);
        const int64_t N = sc.N;
        cpu::SumAcc<S> acc;
        cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
          using V = decltype(zero);
          const At<S, V> px(sc, i, begin, zero);
          acc.add(math::dmol_lse_kept<V>([&](int64_t m) { return px.at(sc.comps + m * N); }, M));
        });
        return acc.total();
      };
      cpu::row_sum_with<S>(a.B, HW, kChunk, pixel_cost(a), ll.data_ptr<S>(), make, chunk_sum);
    });
  });
  return ll;
}

at::Tensor dmol_log_likelihood_backward_cpu(const at::Tensor& grad, const at::Tensor& params_, const at::Tensor& x_,
                                            int64_t num_mixtures, int64_t num_vals, double min_log_scale) {
  constexpr const char* op = "dmol_log_likelihood_backward";
  const DmolArgs a = prepare_dmol(params_, x_, num_mixtures, num_vals, op);
  check_grad_batch(grad, a.B, a.params, op);
  const int64_t HW = a.H * a.W, M = a.M, C = a.C;
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
      const auto make = [&] { return Scratch<S>(a, true); };
      const auto chunk = [&](Scratch<S>& sc, int64_t b, int64_t fbegin, int64_t fend) {
        const int64_t begin = fbegin - b * HW, end = fend - b * HW;
        sc.start(pp, xp, a, b, begin, end, op);
        S* orow = o + b * a.P * HW;
        component_passes<true>(sc, k, M, C, begin, end);
        const int64_t N = sc.N;
        cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
          using V = decltype(zero);
          const At<S, V> px(sc, i, begin, zero);
          cpu::store(sc.lse + px.j, math::dmol_lse_kept<V>([&](int64_t m) { return px.at(sc.comps + m * N); }, M));
        });
        // each component's gradient
        for (int64_t m = 0; m < M; ++m) {
          cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
            using V = decltype(zero);
            const At<S, V> px(sc, i, begin, zero);
            const auto kv = as_vec<V>(k);
            const auto bin = [&](int64_t m, int64_t c, const V& centred, const V&) {
              const S* kept = sc.bins + (m * C + c) * 4 * N;
              return math::dmol_bin_kept(centred, px.at(kept), px.at(kept + N), px.at(kept + 2 * N),
                                         px.at(kept + 3 * N), kv);
            };
            const math::DmolPixel<V> pix{px.at(sc.lse), px.at(sc.lmax), px.at(sc.log_s)};
            math::dmol_grad_component(
                V(gp[b]), m, [&](int64_t p) { return px.param(p); }, [&](int64_t p) { return px.tanh_at(p); },
                [&](int64_t c) { return px.value(c); },
                [&](int64_t c) { return px.scaled(c); }, M, C, kv, pix, px.at(sc.comps + m * N),
                [&](int64_t p, const V& val) {
                  if (px.next) __builtin_prefetch(orow + (px.next - sc.pr) + p * HW, 1);  // for writing
                  cpu::store(orow + p * HW + i, val);
                },
                bin);
          });
        }
      };
      cpu::for_row_chunks_with(a.B, HW, kChunk, pixel_cost(a), make, chunk);
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
