// The per-element formulas of every op, written once.
//
// Each formula is a template over T. T is a scalar (float, double: CUDA threads and
// the CPU tails) or, on the CPU, an at::vec::Vectorized<> (SIMD overloads of the
// same primitives below). The CPU tests prove these lines; the CUDA kernels
// call the very same lines, so only their thread layout is CUDA-specific.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <limits>
#include <type_traits>
#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

namespace hvae_fast {
namespace math {

// ---- primitives ----------------------------------------------------------------------
template <typename T>
C10_HOST_DEVICE inline T where(bool m, T a, T b) { return m ? a : b; }
C10_HOST_DEVICE inline float exp_(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float log_(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double log_(double x) { return ::log(x); }
C10_HOST_DEVICE inline float log1p_(float x) { return ::log1pf(x); }
C10_HOST_DEVICE inline double log1p_(double x) { return ::log1p(x); }
C10_HOST_DEVICE inline float abs_(float x) { return ::fabsf(x); }
C10_HOST_DEVICE inline double abs_(double x) { return ::fabs(x); }
// exp of a softmax term, whose argument is <= 0 up to rounding. Scalar: exp. CPU SIMD:
// ATen's polynomial exp_u20 (within ~2e-6 relative, 3-4x the speed of Sleef's exp,
// which bounded the categorical kernels), with NaN passed through as exp does.
C10_HOST_DEVICE inline float exp_softmax_(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_softmax_(double x) { return ::exp(x); }
// max that propagates NaN, like torch.max
template <typename T>
C10_HOST_DEVICE inline T max_(T a, T b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

#if !defined(__CUDACC__)
// The same primitives for SIMD vectors. They must be declared before the formulas:
// name lookup in a template does not look into this namespace for Vectorized.
template <typename S>
inline at::vec::Vectorized<S> where(
    const at::vec::Vectorized<S>& m, const at::vec::Vectorized<S>& a,
    const at::vec::Vectorized<S>& b) {
  return at::vec::Vectorized<S>::blendv(b, a, m);
}
template <typename S>
inline at::vec::Vectorized<S> exp_(const at::vec::Vectorized<S>& x) { return x.exp(); }
template <typename S>
inline at::vec::Vectorized<S> exp_softmax_(const at::vec::Vectorized<S>& x) {
  return where(x != x, x, x.exp_u20());
}
template <typename S>
inline at::vec::Vectorized<S> log_(const at::vec::Vectorized<S>& x) { return x.log(); }
template <typename S>
inline at::vec::Vectorized<S> log1p_(const at::vec::Vectorized<S>& x) { return x.log1p(); }
template <typename S>
inline at::vec::Vectorized<S> abs_(const at::vec::Vectorized<S>& x) { return x.abs(); }
template <typename S>
inline at::vec::Vectorized<S> max_(const at::vec::Vectorized<S>& a, const at::vec::Vectorized<S>& b) {
  return at::vec::maximum(a, b);
}

#endif

// ---- delta posterior --------------------------------------------------------------
// hardtanh(x, lo, hi); NaN passes through, as in torch.
template <typename T>
C10_HOST_DEVICE inline T clamp_logvar(T x, T lo, T hi) {
  return where(x < lo, lo, where(x > hi, hi, x));
}

// hardtanh's derivative: g strictly inside (lo, hi), 0 at and beyond the bounds.
template <typename T>
C10_HOST_DEVICE inline T clamp_logvar_grad(T g, T x, T lo, T hi) {
  return where((x > lo) & (x < hi), g, T(0));
}

// z = mu_p + dmu + exp((lv_p + c) / 2) * eps and the KL term
// 0.5 * (dmu^2 / exp(lv_p) + exp(c) - c - 1), c = clamp(dlv). Without a prior
// (kPrior false) mu_p = lv_p = 0: the top level against N(0, 1).
template <bool kPrior, typename T>
C10_HOST_DEVICE inline void posterior_forward(
    T dmu, T dlv, T eps, T mu_p, T lv_p, T lo, T hi, T& z, T& kl) {
  const T c = clamp_logvar(dlv, lo, hi);
  T dmu2 = dmu * dmu;
  if constexpr (kPrior) {
    z = mu_p + dmu + exp_(T(0.5) * (lv_p + c)) * eps;
    dmu2 = dmu2 * exp_(T(0) - lv_p);
  } else {
    z = dmu + exp_(T(0.5) * c) * eps;
  }
  kl = T(0.5) * (dmu2 + exp_(c) - c - T(1));
}

// Gradients of posterior_forward given dL/dz (gz) and dL/dkl (gkl) of the element.
// dL/dmu_p is gz itself and is not computed here.
template <bool kPrior, typename T>
C10_HOST_DEVICE inline void posterior_backward(
    T gz, T gkl, T dmu, T dlv, T eps, T lv_p, T lo, T hi,
    T& g_dmu, T& g_dlv, T& g_eps, T& g_lvp) {
  const T c = clamp_logvar(dlv, lo, hi);
  T std_, inv_var_p;
  if constexpr (kPrior) {
    std_ = exp_(T(0.5) * (lv_p + c));
    inv_var_p = exp_(T(0) - lv_p);
  } else {
    std_ = exp_(T(0.5) * c);
    inv_var_p = T(1);
  }
  // z depends on c and on lv_p through the same factor exp((lv_p + c) / 2).
  const T dz_dstd_half = T(0.5) * gz * eps * std_;
  g_eps = gz * std_;
  g_dmu = gz + gkl * dmu * inv_var_p;
  g_dlv = clamp_logvar_grad(dz_dstd_half + T(0.5) * gkl * (exp_(c) - T(1)), dlv, lo, hi);
  if constexpr (kPrior) {
    g_lvp = dz_dstd_half - T(0.5) * gkl * dmu * dmu * inv_var_p;
  }
}

// ---- categorical --------------------------------------------------------------------
// A row's log-sum-exp from its max m and s = sum(exp(l - m)).
template <typename T>
C10_HOST_DEVICE inline T lse_exp_term(T l, T m) { return exp_softmax_(l - m); }
template <typename T>
C10_HOST_DEVICE inline T lse_finish(T m, T s) { return m + log_(s); }
// log_softmax(l)_k = (l_k - m) - log(s): exact to the rounding of l_k - m whatever
// the size of m (m + log(s) alone rounds to m's precision).
template <typename T>
C10_HOST_DEVICE inline T log_softmax_at(T l, T m, T s) { return (l - m) - log_(s); }

// d log_softmax(l)[x] / d l_k, times g: g * ([k == x] - softmax_k).
template <typename T>
C10_HOST_DEVICE inline T categorical_grad(T g, T l, T lse, T onehot) {
  return g * (onehot - exp_softmax_(l - lse));
}

// Reads a class index stored as an integer or as an integral float.
// Returns false when v is not an integer in 0..K-1.
template <typename index_t>
C10_HOST_DEVICE inline bool class_index(index_t v, int64_t K, int64_t& k) {
  if constexpr (std::is_floating_point<index_t>::value) {
    // also false for NaN; the bound check first keeps the cast defined
    if (!(v >= index_t(0) && v < index_t(K))) return false;
    k = static_cast<int64_t>(v);
    return index_t(k) == v;
  } else {
    k = static_cast<int64_t>(v);
    return k >= 0 && k < K;
  }
}

// ---- bernoulli ------------------------------------------------------------------------
// x * log(sigmoid(l)) + (1 - x) * log(sigmoid(-l)), with log(sigmoid(+-l)) =
// -(max(-+l, 0) + log1p(exp(-|l|))): finite for finite l, and at l = +-inf the same
// inf or NaN as the reference (the shorter x * l - softplus(l) gives NaN at x = 0).
template <typename T>
C10_HOST_DEVICE inline T bernoulli_log_prob(T l, T x) {
  const T t = log1p_(exp_(T(0) - abs_(l)));
  const T log_sig_pos = T(0) - (where(l < T(0), T(0) - l, T(0)) + t);
  const T log_sig_neg = T(0) - (where(l > T(0), l, T(0)) + t);
  return x * log_sig_pos + (T(1) - x) * log_sig_neg;
}

// g * (x - sigmoid(l)), with sigmoid from exp(-|l|) so it never overflows.
template <typename T>
C10_HOST_DEVICE inline T bernoulli_grad(T g, T l, T x) {
  const T e = exp_(T(0) - abs_(l));
  const T r = T(1) / (T(1) + e);
  return g * (x - where(l >= T(0), r, e * r));
}

// 0 exactly when x is 0 or 1; positive, inf or NaN otherwise.
template <typename T>
C10_HOST_DEVICE inline T binary_violation(T x) { return abs_(x * (T(1) - x)); }

}  // namespace math
}  // namespace hvae_fast
