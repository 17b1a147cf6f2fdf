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
// The same on a register of counters (math::Lanes): the compiler's own vectorisation of
// the loop above spends most of its time repacking 64-bit products.
inline void philox_uniforms(uint64_t seed, uint64_t first, float (&u)[4][kCounters]) {
  using L = math::Lanes;
  using I = L::I;
  constexpr int64_t W = sizeof(I) / 4;
  static_assert(kCounters % W == 0, "whole registers");
  // first is a multiple of 16: the low words of first + k, k < 16, do not carry
  const I m0 = L::seti(static_cast<int>(0xD2511F53u)), m1 = L::seti(static_cast<int>(0xCD9E8D57u));
  for (int64_t k = 0; k < kCounters; k += W) {
    I c0 = L::add(L::seti(static_cast<int>(static_cast<uint32_t>(first + k))), L::iota());
    I c1 = L::seti(static_cast<int>(static_cast<uint32_t>(first >> 32)));
    I c2 = L::seti(0), c3 = L::seti(0);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      I hi0, lo0, hi1, lo1;
      L::mulhilo(c0, m0, hi0, lo0);
      L::mulhilo(c2, m1, hi1, lo1);
      c0 = L::xor_(L::xor_(hi1, c1), L::seti(static_cast<int>(k0)));
      c2 = L::xor_(L::xor_(hi0, c3), L::seti(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const I w[4] = {c0, c1, c2, c3};
    for (int l = 0; l < 4; ++l)  // math::uniform_from_bits on every lane
      L::store(u[l] + k, L::fma(L::to_float(L::shr<8>(w[l])), L::set(1.0f / 16777216.0f),
                                L::set(1.0f / 33554432.0f)));
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
