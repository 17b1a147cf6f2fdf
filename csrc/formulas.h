// The per-element formulas of every op, written once.
//
// Each formula is a template over T. T is a scalar (float, double: CUDA threads and
// the CPU tails) or, on the CPU, an at::vec::Vectorized<> (SIMD overloads of the
// same primitives below). The CPU tests prove these lines; the CUDA kernels
// call the very same lines, so only their thread layout is CUDA-specific.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

// A CPU build of one instruction-set level (csrc/cpu/kernels.h) keeps its copies of
// these inline functions in a namespace of its own, so levels never share one.
#if defined(HVAE_FAST_CPU_LEVEL) && !defined(__CUDACC__)
#define HVAE_FAST_LEVEL_BEGIN inline namespace HVAE_FAST_CPU_LEVEL {
#define HVAE_FAST_LEVEL_END }
#else
#define HVAE_FAST_LEVEL_BEGIN
#define HVAE_FAST_LEVEL_END
#endif

namespace hvae_fast {
HVAE_FAST_LEVEL_BEGIN
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
C10_HOST_DEVICE inline float sqrt_(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double sqrt_(double x) { return ::sqrt(x); }
C10_HOST_DEVICE inline float sin_(float x) { return ::sinf(x); }
C10_HOST_DEVICE inline double sin_(double x) { return ::sin(x); }
C10_HOST_DEVICE inline float cos_(float x) { return ::cosf(x); }
C10_HOST_DEVICE inline double cos_(double x) { return ::cos(x); }
C10_HOST_DEVICE inline float abs_(float x) { return ::fabsf(x); }
C10_HOST_DEVICE inline double abs_(double x) { return ::fabs(x); }
C10_HOST_DEVICE inline float expm1_(float x) { return ::expm1f(x); }
C10_HOST_DEVICE inline double expm1_(double x) { return ::expm1(x); }
C10_HOST_DEVICE inline float tanh_(float x) { return ::tanhf(x); }
C10_HOST_DEVICE inline double tanh_(double x) { return ::tanh(x); }
// exp of a softmax term, whose argument is <= 0 up to rounding. Scalar: exp. CPU SIMD:
// ATen's polynomial exp_u20 (within ~2e-6 relative, 3-4x the speed of Sleef's exp,
// which bounded the categorical kernels), with NaN passed through as exp does.
C10_HOST_DEVICE inline float exp_softmax_(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_softmax_(double x) { return ::exp(x); }
// exp for an argument below about 88 (float) or 709 (double), or -inf, or NaN. Scalar: exp.
// CPU SIMD: Sleef's exp, but on AVX-512 float the 1-ulp exp_softmax_ below (any argument up
// to overflow; NaN passes through; -inf and anything below -150 give 0).
C10_HOST_DEVICE inline float exp_any_(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_any_(double x) { return ::exp(x); }
// log and expm1 (and tanh) for any argument, NaN passed through. Scalar: the C library's. CPU
// SIMD: Sleef's, but on AVX-512 the inline forms below (within 2 ulp; no call, which would make
// the compiler save every live vector register around it; Sleef's expm1 and tanh also take 2-5x
// the time of these). tanh inline on AVX-512 float only (within 1.4 ulp; to 0.5 ulp where
// 1 - tanh^2 is small), Sleef's in double, whose 1e-10 tolerances its gradient g (1 - tanh^2)
// would not keep at large arguments with a 2-ulp tanh.
C10_HOST_DEVICE inline float log_any_(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double log_any_(double x) { return ::log(x); }
C10_HOST_DEVICE inline float expm1_any_(float x) { return ::expm1f(x); }
C10_HOST_DEVICE inline double expm1_any_(double x) { return ::expm1(x); }
C10_HOST_DEVICE inline float tanh_any_(float x) { return ::tanhf(x); }
C10_HOST_DEVICE inline double tanh_any_(double x) { return ::tanh(x); }
// log(x / y) for y in [1, 4] (NaN passes): log_any_(x / y), but one division in all on AVX-512.
template <typename T>
C10_HOST_DEVICE inline T log_ratio_any_(T x, T y) { return log_any_(x / y); }
// max that propagates NaN, like torch.max
template <typename T>
C10_HOST_DEVICE inline T max_(T a, T b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}
// max for a softmax row's shift, where NaN need not propagate: every exp_softmax_ term
// passes a NaN element on to the sum.
template <typename T>
C10_HOST_DEVICE inline T shift_max_(T a, T b) { return a > b ? a : b; }
// torch's lerp a + w (b - a), taken from the nearer end (b - (b - a)(1 - w) once w >= 0.5),
// so that results match torch's bits
template <typename T>
C10_HOST_DEVICE inline T lerp_(T a, T b, T w) { return w < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w); }

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
inline at::vec::Vectorized<S> lerp_(const at::vec::Vectorized<S>& a, const at::vec::Vectorized<S>& b,
                                    const at::vec::Vectorized<S>& w) {
  using V = at::vec::Vectorized<S>;
  return where(w < V(S(0.5)), a + w * (b - a), b - (b - a) * (V(S(1)) - w));
}
template <typename S>
inline at::vec::Vectorized<S> exp_(const at::vec::Vectorized<S>& x) { return x.exp(); }
template <typename S>
inline at::vec::Vectorized<S> exp_softmax_(const at::vec::Vectorized<S>& x) {
  return where(x != x, x, x.exp_u20());
}
template <typename S>
inline at::vec::Vectorized<S> exp_any_(const at::vec::Vectorized<S>& x) { return x.exp(); }
template <typename S>
inline at::vec::Vectorized<S> log_(const at::vec::Vectorized<S>& x) { return x.log(); }
template <typename S>
inline at::vec::Vectorized<S> log_any_(const at::vec::Vectorized<S>& x) { return x.log(); }
template <typename S>
inline at::vec::Vectorized<S> expm1_any_(const at::vec::Vectorized<S>& x) { return x.expm1(); }
template <typename S>
inline at::vec::Vectorized<S> tanh_any_(const at::vec::Vectorized<S>& x) { return x.tanh(); }
template <typename S>
inline at::vec::Vectorized<S> log_ratio_any_(const at::vec::Vectorized<S>& x, const at::vec::Vectorized<S>& y) {
  return (x / y).log();
}
template <typename S>
inline at::vec::Vectorized<S> log1p_(const at::vec::Vectorized<S>& x) { return x.log1p(); }
template <typename S>
inline at::vec::Vectorized<S> sqrt_(const at::vec::Vectorized<S>& x) { return x.sqrt(); }
template <typename S>
inline at::vec::Vectorized<S> sin_(const at::vec::Vectorized<S>& x) { return x.sin(); }
template <typename S>
inline at::vec::Vectorized<S> cos_(const at::vec::Vectorized<S>& x) { return x.cos(); }
template <typename S>
inline at::vec::Vectorized<S> abs_(const at::vec::Vectorized<S>& x) { return x.abs(); }
template <typename S>
inline at::vec::Vectorized<S> expm1_(const at::vec::Vectorized<S>& x) { return x.expm1(); }
template <typename S>
inline at::vec::Vectorized<S> tanh_(const at::vec::Vectorized<S>& x) { return x.tanh(); }
template <typename S>
inline at::vec::Vectorized<S> max_(const at::vec::Vectorized<S>& a, const at::vec::Vectorized<S>& b) {
  return at::vec::maximum(a, b);
}
template <typename S>
inline at::vec::Vectorized<S> shift_max_(const at::vec::Vectorized<S>& a, const at::vec::Vectorized<S>& b) {
  return at::vec::maximum(a, b);
}

#if defined(CPU_CAPABILITY_AVX2)
inline at::vec::Vectorized<float> shift_max_(const at::vec::Vectorized<float>& a,
                                             const at::vec::Vectorized<float>& b) {
  return _mm256_max_ps(a, b);
}
inline at::vec::Vectorized<double> shift_max_(const at::vec::Vectorized<double>& a,
                                              const at::vec::Vectorized<double>& b) {
  return _mm256_max_pd(a, b);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
inline at::vec::Vectorized<float> shift_max_(const at::vec::Vectorized<float>& a,
                                             const at::vec::Vectorized<float>& b) {
  return _mm512_max_ps(a, b);
}
inline at::vec::Vectorized<double> shift_max_(const at::vec::Vectorized<double>& a,
                                              const at::vec::Vectorized<double>& b) {
  return _mm512_max_pd(a, b);
}
// exp of a softmax term on 16 float lanes, in 13 instructions where exp_u20 and the NaN
// check take 20: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two steps
// (Cody-Waite), Cephes' expf polynomial on |r| <= ln(2) / 2 (about 1 ulp), and vscalefps
// for 2^n, which also rounds underflow to denormals and 0. The clamp keeps -inf from
// making r NaN; NaN passes through every step (it is the max's second operand).
inline at::vec::Vectorized<float> exp_softmax_(const at::vec::Vectorized<float>& v) {
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-150.f), v);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f,
                  1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
inline at::vec::Vectorized<float> exp_any_(const at::vec::Vectorized<float>& v) { return exp_softmax_(v); }

// exp, expm1 and log on AVX-512 float and double lanes, inline. Each is
// written once over Avx512<S>, the few instructions that differ by type.
//   expm1(x) = 2^n (1 + p) - 1 = 2^n p + (2^n - 1), n = round(x / ln 2), r = x - n ln 2
//     (Cody-Waite: ln 2 = hi + lo, hi with its low mantissa bits zero), p = expm1(r) by its
//     Taylor series on |r| <= ln(2) / 2 (to r^8 in float, r^13 in double: the first term
//     left out is under 0.25 ulp). 2^n - 1 is exact for |n| <= 24 (float) / 53 (double) and
//     rounds to 2^n or -1 beyond; for n = 0 the result is p itself, so tiny x keep every bit.
//     x is clamped to [-30, 100] (float) / [-60, 750] (double), where expm1 is -1 or inf.
//   exp(x) = 2^n (1 + p), x clamped to [-1500, 750] (0 and inf beyond); vscalef rounds
//     underflow to denormals and 0 and overflow to inf.
//   log(x) = k ln 2 + log(m), x = m 2^k with m in [0.75, 1.5) (vgetmant, vgetexp: exact, denormals
//     included), log(m) = 2 atanh(s) = 2 s (1 + s^2 / 3 + s^4 / 5 + ...), s = (m - 1) / (m + 1)
//     in [-1/7, 1/5] (to s^11 in float, s^21 in double). log(0) = -inf, log(inf) = inf,
//     log(x < 0) = NaN (vgetmant's sign control), NaN stays NaN.
// The clamps take NaN as their second operand (vmaxps / vminps return it), so NaN passes.
template <typename S>
struct Avx512;
template <>
struct Avx512<float> {
  using R = __m512;
  using Mask = __mmask16;
  static R set(float v) { return _mm512_set1_ps(v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R rcp14(R a) { return _mm512_rcp14_ps(a); }
  static constexpr int kNewton = 1;  // Newton steps after rcp14 (2^-14 relative): 2^-28
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  static R round(R a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R scalef(R a, R n) { return _mm512_scalef_ps(a, n); }
  static R getexp(R a) { return _mm512_getexp_ps(a); }
  static R getmant(R a) { return _mm512_getmant_ps(a, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan); }
  static Mask lt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static R mask_add(R src, Mask m, R a, R b) { return _mm512_mask_add_ps(src, m, a, b); }
  static constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693115234375f, kLn2Lo = 3.194618329871446e-05f;
  static constexpr float kExpm1Lo = -30.f, kExpm1Hi = 100.f;
  // 1 / k!, k = 8 down to 2; 1 / (2 j + 1), j = 5 down to 1
  static constexpr float kExpm1[] = {1.f / 40320, 1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2};
  static constexpr float kAtanh[] = {1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3};
  static constexpr float kAtanhWide[] = {1.f / 15, 1.f / 13, 1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3};
};
template <>
struct Avx512<double> {
  using R = __m512d;
  using Mask = __mmask8;
  static R set(double v) { return _mm512_set1_pd(v); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R div(R a, R b) { return _mm512_div_pd(a, b); }
  static R rcp14(R a) { return _mm512_rcp14_pd(a); }
  static constexpr int kNewton = 2;  // 2^-56
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm512_fnmadd_pd(a, b, c); }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }
  static R min(R a, R b) { return _mm512_min_pd(a, b); }
  static R round(R a) { return _mm512_roundscale_pd(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R scalef(R a, R n) { return _mm512_scalef_pd(a, n); }
  static R getexp(R a) { return _mm512_getexp_pd(a); }
  static R getmant(R a) { return _mm512_getmant_pd(a, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan); }
  static Mask lt(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
  static R mask_add(R src, Mask m, R a, R b) { return _mm512_mask_add_pd(src, m, a, b); }
  static constexpr double kLog2e = 1.4426950408889634, kLn2Hi = 0.6931471801362932, kLn2Lo = 4.236521365809284e-10;
  static constexpr double kExpm1Lo = -60., kExpm1Hi = 750.;
  static constexpr double kExpm1[] = {1. / 6227020800, 1. / 479001600, 1. / 39916800, 1. / 3628800, 1. / 362880,
                                      1. / 40320,      1. / 5040,      1. / 720,      1. / 120,     1. / 24,
                                      1. / 6,          1. / 2};
  static constexpr double kAtanh[] = {1. / 21, 1. / 19, 1. / 17, 1. / 15, 1. / 13, 1. / 11, 1. / 9, 1. / 7, 1. / 5, 1. / 3};
  static constexpr double kAtanhWide[] = {1. / 31, 1. / 29, 1. / 27, 1. / 25, 1. / 23, 1. / 21, 1. / 19, 1. / 17,
                                          1. / 15, 1. / 13, 1. / 11, 1. / 9,  1. / 7,  1. / 5,  1. / 3};
};

// a / b for b positive and normal, without vdiv (whose one unit bounded the kernels): r = 1 / b by
// vrcp14 and Newton's steps, q = a r, then q + r (a - q b), the remainder taken exactly by an FMA:
// within about 0.5 ulp (a correctly rounded division's error) but for rare halfway cases. A b that
// vrcp14 takes to 0 (beyond 2^126 in float) gives 0.
template <typename S>
inline typename Avx512<S>::R avx512_div(typename Avx512<S>::R a, typename Avx512<S>::R b) {
  using A = Avx512<S>;
  const typename A::R one = A::set(S(1));
  typename A::R r = A::rcp14(b);
  for (int i = 0; i < A::kNewton; ++i) r = A::fmadd(r, A::fnmadd(b, r, one), r);
  const typename A::R q = A::mul(a, r);
  return A::fmadd(r, A::fnmadd(q, b, a), q);
}

// n = round(x / ln 2), r = x - n ln 2 and p = expm1(r), for x already clamped.
template <typename S>
inline void avx512_expm1_parts(typename Avx512<S>::R x, typename Avx512<S>::R& n, typename Avx512<S>::R& p) {
  using A = Avx512<S>;
  n = A::round(A::mul(x, A::set(A::kLog2e)));
  typename A::R r = A::fnmadd(n, A::set(A::kLn2Hi), x);
  r = A::fnmadd(n, A::set(A::kLn2Lo), r);
  typename A::R q = A::set(A::kExpm1[0]);
  for (size_t i = 1; i < sizeof(A::kExpm1) / sizeof(S); ++i) q = A::fmadd(q, r, A::set(A::kExpm1[i]));
  p = A::fmadd(q, A::mul(r, r), r);
}
template <typename S>
inline typename Avx512<S>::R avx512_expm1(typename Avx512<S>::R v) {
  using A = Avx512<S>;
  typename A::R n, p;
  avx512_expm1_parts<S>(A::min(A::set(A::kExpm1Hi), A::max(A::set(A::kExpm1Lo), v)), n, p);
  const typename A::R one = A::set(S(1));
  return A::add(A::scalef(p, n), A::sub(A::scalef(one, n), one));
}
template <typename S>
inline typename Avx512<S>::R avx512_exp(typename Avx512<S>::R v) {
  using A = Avx512<S>;
  typename A::R n, p;
  avx512_expm1_parts<S>(A::min(A::set(S(750)), A::max(A::set(S(-1500)), v)), n, p);
  return A::scalef(A::add(p, A::set(S(1))), n);
}
// x = m 2^k, m in [0.75, 1.5): vgetmant and vgetexp, k + 1 where m < 1. x + 0 turns -0 into +0
// (vgetmant takes -0 to -1): log(-0) = -inf.
template <typename S>
inline void avx512_split(typename Avx512<S>::R x, typename Avx512<S>::R& m, typename Avx512<S>::R& k) {
  using A = Avx512<S>;
  const typename A::R one = A::set(S(1));
  x = A::add(x, A::set(S(0)));
  m = A::getmant(x);
  k = A::mask_add(A::getexp(x), A::lt(m, one), A::getexp(x), one);
}
// k ln 2 + 2 atanh(s), s = (u - v) / (u + v), by the series of atanh to the coefficients kCoef
template <typename S, size_t N>
inline typename Avx512<S>::R avx512_log_parts(typename Avx512<S>::R k, typename Avx512<S>::R u,
                                              typename Avx512<S>::R v, const S (&kCoef)[N]) {
  using A = Avx512<S>;
  const typename A::R s2 = avx512_div<S>(A::mul(A::set(S(2)), A::sub(u, v)), A::add(u, v));  // 2 s
  const typename A::R z = A::mul(A::mul(s2, s2), A::set(S(0.25)));                     // s^2
  typename A::R q = A::set(kCoef[0]);
  for (size_t i = 1; i < N; ++i) q = A::fmadd(q, z, A::set(kCoef[i]));
  const typename A::R log_m = A::fmadd(A::mul(s2, z), q, s2);
  // k ln 2 + log(m); k = -inf at x = 0 gives -inf, k = inf at x = inf gives inf
  return A::fmadd(k, A::set(A::kLn2Hi), A::fmadd(k, A::set(A::kLn2Lo), log_m));
}
template <typename S>
inline typename Avx512<S>::R avx512_log(typename Avx512<S>::R x) {
  using A = Avx512<S>;
  typename A::R m, k;
  avx512_split<S>(x, m, k);
  return avx512_log_parts<S>(k, m, A::set(S(1)), A::kAtanh);
}
// log(x / y) with one division, that of s: x / y = (mx / my) 2^(kx - ky), and mx / my in (0.5, 2)
// gives s = (mx - my) / (mx + my) in (-1/3, 1/3) (mx - my exact), taken to s^15 (float) / s^31.
template <typename S>
inline typename Avx512<S>::R avx512_log_ratio(typename Avx512<S>::R x, typename Avx512<S>::R y) {
  using A = Avx512<S>;
  typename A::R mx, kx, my, ky;
  avx512_split<S>(x, mx, kx);
  avx512_split<S>(y, my, ky);
  return avx512_log_parts<S>(A::sub(kx, ky), mx, my, A::kAtanhWide);
}

inline at::vec::Vectorized<double> exp_any_(const at::vec::Vectorized<double>& v) { return avx512_exp<double>(v); }
inline at::vec::Vectorized<float> expm1_any_(const at::vec::Vectorized<float>& v) { return avx512_expm1<float>(v); }
inline at::vec::Vectorized<double> expm1_any_(const at::vec::Vectorized<double>& v) { return avx512_expm1<double>(v); }
inline at::vec::Vectorized<float> log_any_(const at::vec::Vectorized<float>& v) { return avx512_log<float>(v); }
inline at::vec::Vectorized<double> log_any_(const at::vec::Vectorized<double>& v) { return avx512_log<double>(v); }
inline at::vec::Vectorized<float> log_ratio_any_(const at::vec::Vectorized<float>& x,
                                                 const at::vec::Vectorized<float>& y) {
  return avx512_log_ratio<float>(x, y);
}
inline at::vec::Vectorized<double> log_ratio_any_(const at::vec::Vectorized<double>& x,
                                                  const at::vec::Vectorized<double>& y) {
  return avx512_log_ratio<double>(x, y);
}

// tanh on 16 float lanes: |x| < 0.625: its Taylor series to x^21 (the next term is under 2e-9
// of the value); beyond, 1 - 2 / (exp(2 |x|) + 1), whose error is that of the final subtraction
// plus 2 / (exp(2|x|) + 1) times a few ulp: 0.5 ulp as tanh nears 1, where the gradient's
// 1 - tanh^2 cancels. NaN passes; the sign is x's.
inline at::vec::Vectorized<float> tanh_any_(const at::vec::Vectorized<float>& v) {
  const __m512 x = v, a = _mm512_abs_ps(x), z = _mm512_mul_ps(a, a), one = _mm512_set1_ps(1.f);
  // the coefficients of x^21, x^19, ..., x^3: 2^(2k) (2^(2k) - 1) B_2k / (2k)!
  constexpr double kTaylor[] = {18888466084.0 / 194896477400625.0, -443861162.0 / 1856156927625.0,
                                6404582.0 / 10854718875.0,       -929569.0 / 638512875.0,
                                21844.0 / 6081075.0,             -1382.0 / 155925.0,
                                62.0 / 2835.0,                   -17.0 / 315.0,
                                2.0 / 15.0,                      -1.0 / 3.0};
  __m512 q = _mm512_set1_ps(float(kTaylor[0]));
  for (size_t i = 1; i < sizeof(kTaylor) / sizeof(double); ++i) q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(float(kTaylor[i])));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(a, z), q, a);
  // exp(min(2 |x|, 88)): tanh is 1 in float from |x| = 9 on; the clamp keeps inf from making exp NaN
  const __m512 e = exp_softmax_(at::vec::Vectorized<float>(_mm512_min_ps(_mm512_set1_ps(88.f), _mm512_add_ps(a, a))));
  const __m512 big = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), avx512_div<float>(one, _mm512_add_ps(e, one)), one);
  const __m512 r = _mm512_mask_mov_ps(big, _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ), small);
  // r (>= 0) with x's sign bit: bitwise select (0xe4) of r's bits where the mask is set, else x's
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(r), _mm512_castps_si512(x),
                                                       _mm512_set1_epi32(0x7fffffff), 0xe4));
}
#endif

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
// Two exps (one at the top): exp(c / 2) and exp(lv_p / 2) give the standard
// deviation, exp(c) and exp(-lv_p) by squaring; exp bounds these kernels.
template <bool kPrior, typename T>
C10_HOST_DEVICE inline void posterior_forward(
    T dmu, T dlv, T eps, T mu_p, T lv_p, T lo, T hi, T& z, T& kl) {
  const T c = clamp_logvar(dlv, lo, hi);
  const T sd_q = exp_(T(0.5) * c);
  T dmu2 = dmu * dmu;
  if constexpr (kPrior) {
    const T sd_p = exp_(T(0.5) * lv_p);
    z = mu_p + dmu + (sd_p * sd_q) * eps;
    dmu2 = dmu2 / (sd_p * sd_p);
  } else {
    z = dmu + sd_q * eps;
  }
  kl = T(0.5) * (dmu2 + sd_q * sd_q - c - T(1));
}

// Gradients of posterior_forward given dL/dz (gz) and dL/dkl (gkl) of the element.
// dL/dmu_p is gz itself and is not computed here.
template <bool kPrior, typename T>
C10_HOST_DEVICE inline void posterior_backward(
    T gz, T gkl, T dmu, T dlv, T eps, T lv_p, T lo, T hi,
    T& g_dmu, T& g_dlv, T& g_eps, T& g_lvp) {
  const T c = clamp_logvar(dlv, lo, hi);
  const T sd_q = exp_(T(0.5) * c);
  T std_, inv_var_p;
  if constexpr (kPrior) {
    const T sd_p = exp_(T(0.5) * lv_p);
    std_ = sd_p * sd_q;
    inv_var_p = T(1) / (sd_p * sd_p);
  } else {
    std_ = sd_q;
    inv_var_p = T(1);
  }
  // z depends on c and on lv_p through the same factor exp((lv_p + c) / 2).
  const T dz_dstd_half = T(0.5) * gz * eps * std_;
  g_eps = gz * std_;
  g_dmu = gz + gkl * dmu * inv_var_p;
  g_dlv = clamp_logvar_grad(dz_dstd_half + T(0.5) * gkl * (sd_q * sd_q - T(1)), dlv, lo, hi);
  if constexpr (kPrior) {
    g_lvp = dz_dstd_half - T(0.5) * gkl * dmu * dmu * inv_var_p;
  }
}

// ---- in-kernel noise: Philox4x32-10 and Box-Muller ----------------------------------
// The noise of posterior_sample with eps=None (hvae_fast.reference.philox_normal is the
// spec). Rows of M elements are padded to blocks of kNoiseBlock = 64; block t of row b
// (of nb = ceil(M / 64) per row) takes the 16 Philox counters (b * nb + t) * 16 + k,
// k < 16, under the 64-bit key `seed`. Counter k gives 32-bit words w0..w3 and
// element 16 * lane + k of the block is, for lane 0..3:
//   r0 cos(t0), r0 sin(t0), r1 cos(t1), r1 sin(t1),
//   r0 = sqrt(-2 log u(w0)), t0 = 2 pi u(w1), r1 and t1 likewise from w2 and w3,
//   u(w) = (floor(w / 256) + 1/2) / 2^24, in (0, 1).
// Lanes stride by 16 so that a SIMD vector holds one lane of neighbouring counters.
// The numbers depend on (seed, B, M) only: not on the device, dtype's rounding
// aside, or the thread count. |noise| < 5.9 (u >= 2^-25).
constexpr int64_t kNoiseBlock = 64;
constexpr int64_t kNoiseCounters = kNoiseBlock / 4;

C10_HOST_DEVICE inline void philox4x32_10(uint64_t counter, uint64_t seed, uint32_t w[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  w[0] = c0; w[1] = c1; w[2] = c2; w[3] = c3;
}

template <typename T>
C10_HOST_DEVICE inline T uniform_from_bits(uint32_t w) {
  return static_cast<T>(static_cast<int32_t>(w >> 8)) * T(1.0 / 16777216.0) + T(1.0 / 33554432.0);
}

// Two normals from two uniforms in (0, 1).
template <typename T>
C10_HOST_DEVICE inline void box_muller(T u_r, T u_t, T& n_cos, T& n_sin) {
  const T r = sqrt_(T(-2) * log_(u_r));
  const T t = T(6.283185307179586) * u_t;
  n_cos = r * cos_(t);
  n_sin = r * sin_(t);
}

#if !defined(__CUDACC__) && (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512))
// The same two normals on AVX2 or AVX-512 float lanes, which the generic form above leaves bound by
// Sleef's log, sin and cos. Here log(u) is e log 2 + log1p(m - 1) with u = 2^e m,
// m in [sqrt(1/2), sqrt(2)), and the angle is reduced exactly in quarter turns:
// 2 pi u = q pi / 2 + x, |x| <= pi / 4. Cephes' float polynomials (about 1 ulp) for
// log1p, sin and cos. u is never 0, negative or denormal (uniform_from_bits).
// The float lanes of one register, for the SIMD code below written once for both widths.
struct Lanes8 {  // AVX2
  using F = __m256;
  using I = __m256i;
  static F set(float v) { return _mm256_set1_ps(v); }
  static I seti(int v) { return _mm256_set1_epi32(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F xor_(F a, F b) { return _mm256_xor_ps(a, b); }
  static F gt_select(F a, F b, F if_not, F if_gt) { return _mm256_blendv_ps(if_not, if_gt, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
  static F odd_select(I q, F if_even, F if_odd) {
    const I odd = _mm256_cmpeq_epi32(_mm256_and_si256(q, seti(1)), seti(1));
    return _mm256_blendv_ps(if_even, if_odd, _mm256_castsi256_ps(odd));
  }
  static I bits(F a) { return _mm256_castps_si256(a); }
  static F from_bits(I a) { return _mm256_castsi256_ps(a); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static I to_int(F a) { return _mm256_cvtps_epi32(a); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  template <int n> static I shl(I a) { return _mm256_slli_epi32(a, n); }
  template <int n> static I shr(I a) { return _mm256_srli_epi32(a, n); }
  // Philox's 32x32 -> 64-bit products: hi and lo words of a * m, lane by lane
  static void mulhilo(I a, I m, I& hi, I& lo) {
    const I even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
};

#if defined(CPU_CAPABILITY_AVX512)
struct Lanes16 {  // AVX-512
  using F = __m512;
  using I = __m512i;
  static F set(float v) { return _mm512_set1_ps(v); }
  static I seti(int v) { return _mm512_set1_epi32(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F xor_(F a, F b) { return _mm512_xor_ps(a, b); }
  static F gt_select(F a, F b, F if_not, F if_gt) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), if_not, if_gt);
  }
  static F odd_select(I q, F if_even, F if_odd) {
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(q, seti(1)), if_even, if_odd);
  }
  static I bits(F a) { return _mm512_castps_si512(a); }
  static F from_bits(I a) { return _mm512_castsi512_ps(a); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static I to_int(F a) { return _mm512_cvtps_epi32(a); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  template <int n> static I shl(I a) { return _mm512_slli_epi32(a, n); }
  template <int n> static I shr(I a) { return _mm512_srli_epi32(a, n); }
  static void mulhilo(I a, I m, I& hi, I& lo) {
    const I even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
  static I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
};
using Lanes = Lanes16;
#else
using Lanes = Lanes8;
#endif

template <typename L>
inline void box_muller_simd(typename L::F u_r, typename L::F u_t, typename L::F& n_cos, typename L::F& n_sin) {
  using F = typename L::F;
  using I = typename L::I;
  const auto k = [](float v) { return L::set(v); };
  const auto horner = [](F x, F p, std::initializer_list<float> cs) {
    for (float c : cs) p = L::fma(p, x, L::set(c));
    return p;
  };
  // radius sqrt(-2 log u_r)
  const I bits = L::bits(u_r);
  F e = L::to_float(L::sub(L::template shr<23>(bits), L::seti(127)));
  F m = L::from_bits(L::or_(L::and_(bits, L::seti(0x007FFFFF)), L::seti(0x3F800000)));
  e = L::gt_select(m, k(1.41421356f), e, L::add(e, k(1.f)));
  m = L::gt_select(m, k(1.41421356f), m, L::mul(m, k(0.5f)));
  const F x = L::sub(m, k(1.f)), z = L::mul(x, x);
  const F p = horner(x, k(7.0376836292e-2f), {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f,
                                              1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f,
                                              -2.4999993993e-1f, 3.3333331174e-1f});
  F y = L::mul(L::mul(p, x), z);
  y = L::fma(e, k(-2.12194440e-4f), y);
  y = L::fnma(k(0.5f), z, y);
  const F log_u = L::fma(e, k(0.693359375f), L::add(x, y));
  const F r = L::sqrt(L::mul(k(-2.f), log_u));
  // angle 2 pi u_t = q pi / 2 + a
  const F v = L::mul(u_t, k(4.f));
  const F q = L::round(v);
  const F a = L::mul(L::sub(v, q), k(1.57079632679489662f)), a2 = L::mul(a, a);
  const F sin_a = L::fma(L::mul(a, a2), horner(a2, k(-1.9515295891e-4f), {8.3321608736e-3f, -1.6666654611e-1f}), a);
  const F cos_a = L::add(L::fnma(k(0.5f), a2, k(1.f)),
                         L::mul(L::mul(a2, a2), horner(a2, k(2.443315711809948e-5f),
                                                       {-1.388731625493765e-3f, 4.166664568298827e-2f})));
  // quadrant q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s)
  const I qi = L::to_int(q), one = L::seti(1), two = L::seti(2);
  const F sin_sign = L::from_bits(L::template shl<30>(L::and_(qi, two)));
  const F cos_sign = L::from_bits(L::template shl<30>(L::and_(L::add(qi, one), two)));
  const F sin_t = L::xor_(L::odd_select(qi, sin_a, cos_a), sin_sign);
  const F cos_t = L::xor_(L::odd_select(qi, cos_a, sin_a), cos_sign);
  n_cos = L::mul(r, cos_t);
  n_sin = L::mul(r, sin_t);
}

inline void box_muller(const at::vec::Vectorized<float>& u_r, const at::vec::Vectorized<float>& u_t,
                       at::vec::Vectorized<float>& n_cos, at::vec::Vectorized<float>& n_sin) {
  typename Lanes::F c, s;
  box_muller_simd<Lanes>(u_r, u_t, c, s);
  n_cos = at::vec::Vectorized<float>(c);
  n_sin = at::vec::Vectorized<float>(s);
}
#endif

// ---- Adamax -------------------------------------------------------------------------------
// The rounding of adamax_update's intermediate tensors: none in float32 and float64.
struct NoRounding {
  template <typename T>
  C10_HOST_DEVICE T operator()(T v) const { return v; }
};

// One step of torch.optim.Adamax for one element, in torch's order of operations:
// g += wd * p; m = lerp(m, g, 1 - beta1); u = max(u * beta2, |g| + eps); p += (-clr * m) / u,
// clr = lr / (1 - beta1^step). NaN propagates as in torch.maximum. `round` rounds what
// torch's foreach step keeps as tensors of the parameters' dtype (the decayed gradient,
// m, u * beta2, |g| + eps) to that dtype: the identity in float32 and float64; in float16
// and bfloat16 (the CUDA kernel) m and u then round as torch's foreach step rounds them,
// and the update reads the rounded m and u, as torch's does. (torch's CUDA addcdiv computes
// p + clr * (m / u), this p + (clr * m) / u, as torch's CPU addcdiv does: the last bit of
// p may differ.)
template <typename T, typename Round = NoRounding>
C10_HOST_DEVICE inline void adamax_update(T& p, T g, T& m, T& u, T one_minus_beta1, T beta2, T eps, T wd,
                                          T neg_clr, const Round& round = Round()) {
  g = round(g + wd * p);
  m = round(lerp_(m, g, one_minus_beta1));  // torch's lerp: m matches torch's bits for any beta1
  u = max_(round(u * beta2), round(abs_(g) + eps));
  p = p + neg_clr * m / u;
}

// ---- categorical --------------------------------------------------------------------
// A row's log-sum-exp is kept as its two parts, the max m and log s, s = sum(exp(l - m)):
// m + log(s) alone rounds to m's precision (ulp(1e4) = 1e-3 in float32), which the
// softmax exp(l - lse) would carry.
template <typename T>
C10_HOST_DEVICE inline T lse_exp_term(T l, T m) { return exp_softmax_(l - m); }
// log_softmax(l)_k = (l_k - m) - log(s): exact to the rounding of l_k - m whatever
// the size of m.
template <typename T>
C10_HOST_DEVICE inline T log_softmax_at(T l, T m, T log_s) { return (l - m) - log_s; }

// d log_softmax(l)[x] / d l_k, times g: g * ([k == x] - softmax_k).
template <typename T>
C10_HOST_DEVICE inline T categorical_grad(T g, T l, T m, T log_s, T onehot) {
  return g * (onehot - exp_softmax_(log_softmax_at(l, m, log_s)));
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


// ---- discretized logistic mixture (dmol_log_likelihood) ---------------------------------
// Loops over components and channels stay rolled on the GPU (their bounds are run-time values;
// unrolled copies spill registers in the backward).
#if defined(__CUDACC__)
#define HVAE_FAST_ROLLED _Pragma("unroll 1")
#else
#define HVAE_FAST_ROLLED
#endif

// A pixel value v in 0..K-1 scaled to x = v / (K - 1) * 2 - 1 (in this order, as the
// reference), bins of half-width h = 1 / (K - 1). For one channel of one component, with
// mean mu and log-scale s clamped below at lo, inv = exp(-s), a = inv (x - mu + h),
// b = inv (x - mu - h), t = a - b = 2 h inv (taken as 2h * inv: no cancellation):
//   v = 0:      log sigmoid(a)
//   v = K - 1:  log sigmoid(-b)
//   otherwise:  log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(-expm1(-t)),
// which never subtracts two near-equal numbers.
template <typename T>
C10_HOST_DEVICE inline T dmol_scaled(T v, T K_minus_1) { return v / K_minus_1 * T(2) - T(1); }

// log(sigmoid(a)) = -(max(-a, 0) + log1p(exp(-|a|))): finite for finite a.
template <typename T>
C10_HOST_DEVICE inline T log_sigmoid(T a) {
  return T(0) - (where(a < T(0), T(0) - a, T(0)) + log1p_(exp_(T(0) - abs_(a))));
}

// sigmoid(a) from exp(-|a|): never overflows.
template <typename T>
C10_HOST_DEVICE inline T sigmoid_(T a) {
  const T e = exp_(T(0) - abs_(a));
  const T r = T(1) / (T(1) + e);
  return where(a >= T(0), r, e * r);
}

// torch.clamp(s, min=lo): NaN passes through.
template <typename T>
C10_HOST_DEVICE inline T clamp_min_(T s, T lo) { return where(s < lo, lo, s); }

// A log-sum-exp's shift: the max, or 0 where it is +-inf (as torch.logsumexp), so that a
// row of -inf gives -inf, not NaN.
template <typename T>
C10_HOST_DEVICE inline T lse_shift(T m) {
  return where(abs_(m) == T(std::numeric_limits<float>::infinity()), T(0), m);
}

// One channel of one component at one pixel: inv = exp(-clamp(s)), a, b, t as above, and the
// three exponentials every term and gradient is made of: ea = exp(-|a|), eb = exp(-|b|),
// em = -expm1(-t) = 1 - exp(-t). 4 transcendental functions (the *_any_ primitives: inline on
// AVX-512); the forward takes one log more, the gradient none.
template <typename T>
struct DmolBin {
  T inv, a, b, t, ea, eb, em;
};

template <typename T, typename K>
C10_HOST_DEVICE inline DmolBin<T> dmol_bin(T centred, T log_scale, const K& k) {
  // aggregate-initialised: a default-constructed Vectorized member can be an out-of-line call
  const T inv = exp_any_(T(0) - clamp_min_(log_scale, k.lo));
  const T a = inv * (centred + k.h), b = inv * (centred - k.h), t = k.two_h * inv;
  return {inv, a, b, t, exp_any_(T(0) - abs_(a)), exp_any_(T(0) - abs_(b)), T(0) - expm1_any_(T(0) - t)};
}

// The DmolBin of a channel from its centred value, log-scale and inv, ea, eb, em kept from
// dmol_bin (the CPU backward keeps these four per component and channel: its gradient pass
// then takes no transcendental function per channel).
template <typename T, typename K>
C10_HOST_DEVICE inline DmolBin<T> dmol_bin_kept(T centred, T inv, T ea, T eb, T em, const K& k) {
  return {inv, inv * (centred + k.h), inv * (centred - k.h), k.two_h * inv, ea, eb, em};
}

// What dmol_component and dmol_grad do with each channel's DmolBin by default: dmol_component
// keeps none (keep_bin(m, c, q) sees them where a kernel passes one); dmol_grad computes it again
// (bin(m, c, centred, log_scale) gives it where a kernel passes one).
struct DmolNoKeep {
  template <typename... A>
  C10_HOST_DEVICE void operator()(const A&...) const {}
};
template <typename Bin, typename T, typename K>
C10_HOST_DEVICE inline DmolBin<T> dmol_bin_or_kept(const Bin& bin, int64_t m, int64_t c, T centred, T log_scale,
                                                   const K& k) {
  if constexpr (std::is_same<Bin, DmolNoKeep>::value) {
    return dmol_bin(centred, log_scale, k);
  } else {
    return bin(m, c, centred, log_scale);
  }
}

// The bin's log-probability, with one log: log sigmoid(a) = min(a, 0) - log(1 + ea) and
// log sigmoid(-b) = min(-b, 0) - log(1 + eb), so
//   v = 0:      min(a, 0) + log(1 / (1 + ea))
//   v = K - 1:  min(-b, 0) + log(1 / (1 + eb))
//   otherwise:  min(a, 0) + min(-b, 0) + log(em / ((1 + ea)(1 + eb)))
// (1 + ea, 1 + eb in [1, 2]: the quotient neither under- nor overflows beyond em itself).
// lower / upper: v == 0 / v == K - 1 (bool, or a SIMD mask).
template <typename T, typename Mask>
C10_HOST_DEVICE inline T dmol_bin_log_prob(Mask lower, Mask upper, const DmolBin<T>& q) {
  const T zero(0), one(1);
  const T lin =
      where(upper, zero, where(q.a < zero, q.a, zero)) + where(lower, zero, where(q.b > zero, zero - q.b, zero));
  const T num = where(lower, one, where(upper, one, q.em));
  const T den = where(upper, one, one + q.ea) * where(lower, one, one + q.eb);
  return lin + log_ratio_any_(num, den);
}

// Gradients of dmol_bin_log_prob times w w.r.t. the mean and the (unclamped) log-scale, from
// the same DmolBin (no further transcendental call): d/da log sigmoid(a) = sigmoid(-a),
// d/db log sigmoid(-b) = -sigmoid(b), d/dt log(-expm1(-t)) = 1 / expm1(t) = (1 - em) / em;
// d/dmean = -inv (da + db) and, as d(a, b, t)/ds = -(a, b, t), d/ds = -(a da + b db + t dt),
// 0 below the clamp (torch.clamp's gradient: passed where s >= lo).
template <typename T, typename Mask>
C10_HOST_DEVICE inline void dmol_bin_grad(Mask lower, Mask upper, const DmolBin<T>& q, T log_scale, T lo, T w,
                                          T& g_mean, T& g_log_scale) {
  const T zero(0), one(1);
  // 1 / (1 + ea) and 1 / (1 + eb) from one division (1 + ea, 1 + eb in [1, 2])
  const T pa = one + q.ea, pb = one + q.eb, r = one / (pa * pb);
  const T da = where(upper, zero, where(q.a < zero, one, q.ea) * (pb * r));
  const T db = where(lower, zero, zero - where(q.b < zero, q.eb, one) * (pa * r));
  const T dt = where(lower, zero, where(upper, zero, (one - q.em) / q.em));
  g_mean = zero - w * q.inv * (da + db);
  g_log_scale = where(log_scale >= lo, zero - w * (q.a * da + q.b * db + q.t * dt), zero);
}

// d tanh(c) / dc times g.
template <typename T>
C10_HOST_DEVICE inline T tanh_grad(T g, T tanh_c) { return g * (T(1) - tanh_c * tanh_c); }

// The parameter channels of component m (of M) for image channel c (of C), and of the
// coupling coefficient of channels (c, k), k < c: pairs (1,0), (2,0), (2,1), (3,0), ...
C10_HOST_DEVICE inline int64_t dmol_channels(int64_t M, int64_t C) { return M * (1 + 2 * C + C * (C - 1) / 2); }
C10_HOST_DEVICE inline int64_t dmol_mean_channel(int64_t M, int64_t c, int64_t m) { return M + c * M + m; }
C10_HOST_DEVICE inline int64_t dmol_log_scale_channel(int64_t M, int64_t C, int64_t c, int64_t m) {
  return M + C * M + c * M + m;
}
C10_HOST_DEVICE inline int64_t dmol_coef_channel(int64_t M, int64_t C, int64_t c, int64_t k, int64_t m) {
  return M + 2 * C * M + (c * (c - 1) / 2 + k) * M + m;
}

// The constants of one call, in the kernel's type: K - 1, the clamp lo, h and 2h.
template <typename T>
struct DmolConsts {
  T K1, lo, h, two_h;
};

// One pixel of the mixture. param(p) reads parameter channel p at the pixel, value(c) the
// pixel value v of image channel c (as T), scaled(c) its dmol_scaled x. The mixture
// logits' log-softmax is (l - lmax) - log_s (dmol_logits).
template <typename T, typename Param>
C10_HOST_DEVICE inline void dmol_logits(const Param& param, int64_t M, T& lmax, T& log_s) {
  lmax = param(0);
  HVAE_FAST_ROLLED
  for (int64_t m = 1; m < M; ++m) lmax = max_(lmax, param(m));
  T s = T(0);
  HVAE_FAST_ROLLED
  for (int64_t m = 0; m < M; ++m) s = s + exp_any_(param(m) - lmax);
  log_s = log_any_(s);
}

// The mean of channel c in component m: its mean channel plus tanh(coef(c, k)) x_k, k < c.
// tanh_at(p) gives tanh of parameter channel p (the CPU computes each once per pixel).
template <typename T, typename Param, typename Tanh, typename Scaled>
C10_HOST_DEVICE inline T dmol_mean(const Param& param, const Tanh& tanh_at, const Scaled& scaled, int64_t M, int64_t C,
                                   int64_t c, int64_t m) {
  T mean = param(dmol_mean_channel(M, c, m));
  HVAE_FAST_ROLLED
  for (int64_t k = 0; k < c; ++k) mean = mean + tanh_at(dmol_coef_channel(M, C, c, k, m)) * scaled(k);
  return mean;
}

// log_softmax(logits)_m + the sum over channels of the bin log-probability in component m.
// keep_bin(m, c, q) sees each channel's DmolBin.
template <typename T, typename Param, typename Tanh, typename Value, typename Scaled, typename KeepBin = DmolNoKeep>
C10_HOST_DEVICE inline T dmol_component(const Param& param, const Tanh& tanh_at, const Value& value,
                                        const Scaled& scaled, int64_t M, int64_t C, int64_t m, T lmax, T log_s,
                                        const DmolConsts<T>& k, const KeepBin& keep_bin = KeepBin{}) {
  T comp = log_softmax_at(param(m), lmax, log_s);
  HVAE_FAST_ROLLED
  for (int64_t c = 0; c < C; ++c) {
    const T v = value(c);
    const DmolBin<T> q = dmol_bin(scaled(c) - dmol_mean<T>(param, tanh_at, scaled, M, C, c, m),
                                  param(dmol_log_scale_channel(M, C, c, m)), k);
    keep_bin(m, c, q);
    comp = comp + dmol_bin_log_prob(v == T(0), v == k.K1, q);
  }
  return comp;
}

// One pixel's log p(x) and its logits' log-softmax shift (lmax, log_s: dmol_logits).
template <typename T>
struct DmolPixel {
  T lse, lmax, log_s;
};

// log p(x) at one pixel: the log-sum-exp over components, taken online (no buffer of M):
// sum = sum of exp(comp - shift), shift = lse_shift(max so far), rescaled when the max grows
// (by exp(old max - new shift): exp(lse_shift(old max) - shift) would be 0 * inf at the first
// component, whose old max is -inf). keep(m, comp) sees each component's value. The GPU's form;
// the CPU keeps the components and takes dmol_lse_kept.
template <typename T, typename Param, typename Tanh, typename Value, typename Scaled, typename Keep>
C10_HOST_DEVICE inline DmolPixel<T> dmol_pixel(const Param& param, const Tanh& tanh_at, const Value& value,
                                              const Scaled& scaled, int64_t M, int64_t C, const DmolConsts<T>& k, const Keep& keep) {
  DmolPixel<T> r{T(0), T(0), T(0)};  // see dmol_bin
  dmol_logits(param, M, r.lmax, r.log_s);
  T mx = T(-std::numeric_limits<float>::infinity()), sum = T(0);
  HVAE_FAST_ROLLED
  for (int64_t m = 0; m < M; ++m) {
    const T comp = dmol_component(param, tanh_at, value, scaled, M, C, m, r.lmax, r.log_s, k);
    keep(m, comp);
    const T nm = max_(mx, comp);
    const T shift = lse_shift(nm);
    sum = sum * exp_any_(mx - shift) + exp_any_(comp - shift);  // mx = -inf: sum is 0, and so is the factor
    mx = nm;
  }
  r.lse = lse_shift(mx) + log_any_(sum);
  return r;
}

// The log-sum-exp over components where they are kept (the CPU): comp(m) reads component m's
// value, and the sum takes M exps in two passes (max, then the sum) where dmol_pixel's online
// form takes 2M. The same value up to rounding: a row of -inf gives -inf, NaN propagates.
template <typename T, typename Comp>
C10_HOST_DEVICE inline T dmol_lse_kept(const Comp& comp, int64_t M) {
  T mx = comp(0);
  HVAE_FAST_ROLLED
  for (int64_t m = 1; m < M; ++m) mx = max_(mx, comp(m));
  const T shift = lse_shift(mx);
  T sum = T(0);
  HVAE_FAST_ROLLED
  for (int64_t m = 0; m < M; ++m) sum = sum + exp_any_(comp(m) - shift);
  return shift + log_any_(sum);
}

template <typename T, typename Param, typename Tanh, typename Value, typename Scaled>
C10_HOST_DEVICE inline T dmol_log_prob(const Param& param, const Tanh& tanh_at, const Value& value,
                                       const Scaled& scaled, int64_t M, int64_t C, const DmolConsts<T>& k) {
  return dmol_pixel(param, tanh_at, value, scaled, M, C, k, [](int64_t, const T&) {}).lse;
}

// g times the gradient of dmol_log_prob w.r.t. every parameter channel of component m at the
// pixel, each passed once to out(p, value), given the pixel's dmol_pixel px and comp_m, the
// component's value (kept on the CPU, computed again by dmol_component on the GPU). Its
// responsibility r = exp(comp_m - lse): d/dlogit_m = g (r - softmax_m), and each channel's mean,
// log-scale and coefficients get g r times their dmol_bin_grad. bin(m, c, centred, log_scale)
// gives the channel's DmolBin where it was kept (the CPU: dmol_bin_kept); by default dmol_bin
// computes it again.
template <typename T, typename Param, typename Tanh, typename Value, typename Scaled, typename Out,
          typename Bin = DmolNoKeep>
C10_HOST_DEVICE inline void dmol_grad_component(T g, int64_t m, const Param& param, const Tanh& tanh_at,
                                                const Value& value, const Scaled& scaled, int64_t M, int64_t C,
                                                const DmolConsts<T>& k, const DmolPixel<T>& px, T comp_m,
                                                const Out& out, const Bin& bin = Bin{}) {
  const T w = g * exp_any_(comp_m - px.lse);
  out(m, w - g * exp_any_(log_softmax_at(param(m), px.lmax, px.log_s)));
  HVAE_FAST_ROLLED
  for (int64_t c = 0; c < C; ++c) {
    const T v = value(c);
    const int64_t ls = dmol_log_scale_channel(M, C, c, m);
    const T log_scale = param(ls);
    const T centred = scaled(c) - dmol_mean<T>(param, tanh_at, scaled, M, C, c, m);
    const DmolBin<T> q = dmol_bin_or_kept(bin, m, c, centred, log_scale, k);
    T g_mean(0), g_log_scale(0);
    dmol_bin_grad(v == T(0), v == k.K1, q, log_scale, k.lo, w, g_mean, g_log_scale);
    out(dmol_mean_channel(M, c, m), g_mean);
    out(ls, g_log_scale);
    HVAE_FAST_ROLLED
    for (int64_t j = 0; j < c; ++j) {
      const int64_t p = dmol_coef_channel(M, C, c, j, m);
      out(p, tanh_grad(g_mean, tanh_at(p)) * scaled(j));
    }
  }
}

// dmol_grad_component for every component: comp(m) gives component m's value.
template <typename T, typename Param, typename Tanh, typename Value, typename Scaled, typename Comp, typename Out>
C10_HOST_DEVICE inline void dmol_grad(T g, const Param& param, const Tanh& tanh_at, const Value& value,
                                      const Scaled& scaled, int64_t M, int64_t C, const DmolConsts<T>& k,
                                      const DmolPixel<T>& px, const Comp& comp, const Out& out) {
  HVAE_FAST_ROLLED
  for (int64_t m = 0; m < M; ++m) dmol_grad_component(g, m, param, tanh_at, value, scaled, M, C, k, px, comp(m), out);
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
HVAE_FAST_LEVEL_END
}  // namespace hvae_fast
