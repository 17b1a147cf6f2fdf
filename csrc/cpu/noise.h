// One 64-element block of posterior_sample's in-kernel noise (csrc/formulas.h defines it).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../formulas.h"

namespace hvae_fast {
namespace cpu {

// out[0 .. 64) = the normals of the block whose first Philox counter is `first`.
template <typename S>
inline void philox_normal_block(uint64_t seed, uint64_t first, S* out) {
  using Vec = at::vec::Vectorized<S>;
  constexpr int64_t C = math::kNoiseCounters;
  alignas(64) S u[4][C];
  // Independent counters: the compiler runs this loop on SIMD lanes.
  for (int64_t k = 0; k < C; ++k) {
    uint32_t w[4];
    math::philox4x32_10(first + k, seed, w);
    for (int l = 0; l < 4; ++l) u[l][k] = math::uniform_from_bits<S>(w[l]);
  }
  static_assert(C % Vec::size() == 0, "a block holds whole vectors");
  for (int64_t k = 0; k < C; k += Vec::size()) {
    for (int pair = 0; pair < 2; ++pair) {
      Vec n_cos, n_sin;
      math::box_muller(Vec::loadu(u[2 * pair] + k), Vec::loadu(u[2 * pair + 1] + k), n_cos, n_sin);
      n_cos.store(out + 2 * pair * C + k);
      n_sin.store(out + (2 * pair + 1) * C + k);
    }
  }
}

}  // namespace cpu
}  // namespace hvae_fast
