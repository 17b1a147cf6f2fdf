// One 64-element block of posterior_sample's in-kernel noise (csrc/formulas.h defines it).
#pragma once

#if !defined(HVAE_FAST_CPU_LEVEL)
#error "compiled once per CPU level by setup.py (csrc/cpu/kernels.h)"
#endif

#include <ATen/cpu/vec/vec.h>

#include "../formulas.h"

namespace hvae_fast {
namespace cpu {
inline namespace HVAE_FAST_CPU_LEVEL {

constexpr int64_t kCounters = math::kNoiseCounters;

// u[lane][k] = uniform_from_bits(word `lane` of Philox counter first + k), k < 16.
template <typename S>
inline void philox_uniforms(uint64_t seed, uint64_t first, S (&u)[4][kCounters]) {
  for (int64_t k = 0; k < kCounters; ++k) {
    uint32_t w[4];
    math::philox4x32_10(first + k, seed, w);
    for (int l = 0; l < 4; ++l) u[l][k] = math::uniform_from_bits<S>(w[l]);
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The same on 8 counters per AVX2 register: the compiler's own vectorisation of the
// loop above spends most of its time repacking 64-bit products.
inline void mulhilo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline void philox_uniforms(uint64_t seed, uint64_t first, float (&u)[4][kCounters]) {
  static_assert(kCounters % 8 == 0, "whole registers");
  // first is a multiple of 16: the low words of first + k, k < 16, do not carry
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int64_t k = 0; k < kCounters; k += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first + k))),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(c0, m0, hi0, lo0);
      mulhilo(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m256i w[4] = {c0, c1, c2, c3};
    for (int l = 0; l < 4; ++l) {  // math::uniform_from_bits on 8 lanes
      const __m256 top = _mm256_cvtepi32_ps(_mm256_srli_epi32(w[l], 8));
      _mm256_storeu_ps(u[l] + k, _mm256_fmadd_ps(top, _mm256_set1_ps(1.0f / 16777216.0f),
                                                 _mm256_set1_ps(1.0f / 33554432.0f)));
    }
  }
}
#endif

// out[0 .. 64) = the normals of the block whose first Philox counter is `first`.
template <typename S>
inline void philox_normal_block(uint64_t seed, uint64_t first, S* out) {
  using Vec = at::vec::Vectorized<S>;
  alignas(64) S u[4][kCounters];
  philox_uniforms(seed, first, u);
  static_assert(kCounters % Vec::size() == 0, "a block holds whole vectors");
  for (int64_t k = 0; k < kCounters; k += Vec::size()) {
    for (int pair = 0; pair < 2; ++pair) {
      Vec n_cos, n_sin;
      math::box_muller(Vec::loadu(u[2 * pair] + k), Vec::loadu(u[2 * pair + 1] + k), n_cos, n_sin);
      n_cos.store(out + 2 * pair * kCounters + k);
      n_sin.store(out + (2 * pair + 1) * kCounters + k);
    }
  }
}

}  // namespace HVAE_FAST_CPU_LEVEL
}  // namespace cpu
}  // namespace hvae_fast
