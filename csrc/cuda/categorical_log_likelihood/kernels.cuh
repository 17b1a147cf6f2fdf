// The kernels of hvae_fast::categorical_log_likelihood and their launchers (the layout is
// described in ../categorical_log_likelihood.cu). Included only by the files beside it, one
// per logits dtype, that instantiate Launch<S, I>: the 240 kernels (team sizes x load widths
// x index types x forward/backward, per dtype) compile in four translation units at once
// instead of one.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <limits>
#include <type_traits>

#include "../../formulas.h"
#include "../launch.cuh"
#include "launchers.h"

namespace hvae_fast {
namespace categorical_cuda {


using cuda::kThreads;

// Logits per block and chunk, about: enough work per block to hide the launch, enough
// blocks to fill the GPU at B = 128.
constexpr int64_t kChunkElems = 16384;

// Threads per row for K classes (the module comment).
inline int team_size(int64_t K) {
  if (K <= 16) return 4;
  if (K <= 32) return 8;
  if (K <= 64) return 16;
  if (K < 2048) return 32;
  return kThreads;
}

// Rows of one example per block: whole passes of the block's teams.
inline int64_t chunk_rows(int64_t D, int64_t K, int G) {
  const int64_t per_pass = kThreads / G;
  const int64_t passes_for_d = std::max<int64_t>(1, (D + per_pass - 1) / per_pass);
  const int64_t passes = std::min(passes_for_d, std::max<int64_t>(1, kChunkElems / (per_pass * K)));
  return per_pass * passes;
}

template <typename S>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(S);
  S v[N];
};

template <typename S>
inline bool aligned16(const S* p, int64_t K) {
  return K % Vec16<S>::N == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// op(acc, l) over the team's share of the row (lane, lane + G, ... in vectors or scalars).
template <int G, bool kVec, typename A, typename S, typename Op>
__device__ inline A fold_row(const S* row, int64_t K, int lane, A acc, const Op& op) {
  if constexpr (kVec) {
    const auto* vrow = reinterpret_cast<const Vec16<S>*>(row);
    const int64_t nv = K / Vec16<S>::N;
    for (int64_t v = lane; v < nv; v += G) {
      const Vec16<S> x = vrow[v];
#pragma unroll
      for (int e = 0; e < Vec16<S>::N; ++e) acc = op(acc, static_cast<A>(x.v[e]));
    }
  } else {
    for (int64_t k = lane; k < K; k += G) acc = op(acc, static_cast<A>(row[k]));
  }
  return acc;
}

template <int G, typename T, typename Op>
__device__ inline T team_reduce(T v, const Op& op) {
  if constexpr (G == kThreads) return cuda::block_all_reduce(v, op);
  else return cuda::group_reduce<G>(v, op);
}

template <int G, bool kVec, typename S, typename I>
__global__ void __launch_bounds__(kThreads) forward_kernel(const S* logits, const I* x, int64_t D, int64_t K,
                                                           int64_t rows_per_chunk, int64_t chunks,
                                                           at::opmath_type<S>* lse, S* ll,
                                                           at::opmath_type<S>* partial) {
  using A = at::opmath_type<S>;
  constexpr int kTeams = kThreads / G;
  const int64_t blk = blockIdx.x;
  const int64_t b = static_cast<uint32_t>(blk) / static_cast<uint32_t>(chunks);  // once per block, 32-bit (grid_size)
  const int64_t c = blk - b * chunks;
  const int team = threadIdx.x / G, lane = threadIdx.x % G;
  const int64_t d0 = c * rows_per_chunk, d1 = std::min(D, d0 + rows_per_chunk);
  const auto max = [](A a, A v) { return math::shift_max_(a, v); };
  const auto add = [](A a, A v) { return a + v; };
  A acc = 0;  // this team's rows' log-probabilities (in its lane 0)
  // passes uniform over the block (the reductions need every thread); a team past the
  // chunk's end computes nothing and reads nothing
  for (int64_t first = d0; first < d1; first += kTeams) {
    const int64_t d = first + team;
    const bool active = d < d1;
    const int64_t r = b * D + d;
    const S* row = logits + r * K;
    I xv = I(0);
    if (active && lane == 0) xv = x[r];  // issued first: its latency hides behind the row
    A m = -std::numeric_limits<A>::infinity();
    if (active) m = fold_row<G, kVec, A>(row, K, lane, m, max);
    m = team_reduce<G>(m, max);
    A s = 0;
    if (active) s = fold_row<G, kVec, A>(row, K, lane, s, [m](A a, A l) { return a + math::lse_exp_term(l, m); });
    s = team_reduce<G>(s, add);
    if (active && lane == 0) {
      int64_t k = 0;
      const bool ok = math::class_index(xv, K, k);
      CUDA_KERNEL_ASSERT(ok && "categorical_log_likelihood: x holds a value that is not a class index in 0..K-1");
      const A log_s = math::log_(s);
      lse[2 * r] = m;
      lse[2 * r + 1] = log_s;
      acc += ok ? math::log_softmax_at(static_cast<A>(row[k]), m, log_s) : std::numeric_limits<A>::quiet_NaN();
    }
  }
  acc = cuda::block_sum(acc);
  if (threadIdx.x == 0) {
    if (chunks == 1) ll[b] = static_cast<S>(acc);
    else partial[blk] = acc;
  }
}

template <int G, bool kVec, typename S, typename I>
void launch_forward_as(const S* l, const I* x, int64_t B, int64_t D, int64_t K, at::Tensor& ll, at::Tensor& lse) {
  using A = at::opmath_type<S>;
  const int64_t rows = chunk_rows(D, K, G);
  const int64_t chunks = std::max<int64_t>(1, (D + rows - 1) / rows);
  at::Tensor partial;
  if (chunks > 1) partial = at::empty({B * chunks}, lse.options());
  forward_kernel<G, kVec, S, I><<<cuda::grid_size(B * chunks, "categorical_log_likelihood"), kThreads, 0,
                                  cuda::stream()>>>(l, x, D, K, rows, chunks, lse.data_ptr<A>(), ll.data_ptr<S>(),
                                                    chunks > 1 ? partial.data_ptr<A>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 1) {
    cuda::row_sum_finish_kernel<A><<<cuda::grid_size(B, "categorical_log_likelihood"), kThreads, 0,
                                     cuda::stream()>>>(chunks, partial.const_data_ptr<A>(), ll.data_ptr<S>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}


// Calls f(G constant, kVec constant) for the layout of K.
template <typename F>
void with_layout(int64_t K, bool vec, const F& f) {
  const auto v = [&](auto g) {
    if (vec) f(g, std::true_type{});
    else f(g, std::false_type{});
  };
  switch (team_size(K)) {
    case 4: return v(std::integral_constant<int, 4>{});
    case 8: return v(std::integral_constant<int, 8>{});
    case 16: return v(std::integral_constant<int, 16>{});
    case 32: return v(std::integral_constant<int, 32>{});
    default: return v(std::integral_constant<int, kThreads>{});
  }
}

template <typename S, typename I>
void Launch<S, I>::forward(const at::Tensor& logits, const I* x, int64_t B, int64_t D, int64_t K, at::Tensor& ll,
                          at::Tensor& lse) {
  const S* l = logits.const_data_ptr<S>();
  with_layout(K, aligned16(l, K), [&](auto g, auto vec) {
    launch_forward_as<decltype(g)::value, decltype(vec)::value>(l, x, B, D, K, ll, lse);
  });
}

template <int G, bool kVec, typename S, typename I>
__global__ void __launch_bounds__(kThreads) backward_kernel(const at::opmath_type<S>* grad, const S* logits, const I* x,
                                                            const at::opmath_type<S>* lse, int64_t D, int64_t K,
                                                            int64_t rows_per_chunk, int64_t chunks, S* out) {
  using A = at::opmath_type<S>;
  constexpr int kTeams = kThreads / G;
  const int64_t blk = blockIdx.x;
  const int64_t b = static_cast<uint32_t>(blk) / static_cast<uint32_t>(chunks);  // 32-bit: chunks <= blocks < 2^31
  const int64_t c = blk - b * chunks;
  const int team = threadIdx.x / G, lane = threadIdx.x % G;
  const int64_t d1 = std::min(D, (c + 1) * rows_per_chunk);
  const A g = grad[b];  // once per block
  for (int64_t d = c * rows_per_chunk + team; d < d1; d += kTeams) {
    const int64_t r = b * D + d;
    int64_t target = 0;
    const bool ok = math::class_index(x[r], K, target);
    if (lane == 0) {
      CUDA_KERNEL_ASSERT(ok && "categorical_log_likelihood_backward: x holds a value that is not a class index");
    }
    if (!ok) target = -1;
    const A m = lse[2 * r], log_s = lse[2 * r + 1];
    const S* row = logits + r * K;
    S* orow = out + r * K;
    if constexpr (kVec) {
      constexpr int N = Vec16<S>::N;
      const int64_t nv = K / N;
      for (int64_t v = lane; v < nv; v += G) {
        const Vec16<S> in = reinterpret_cast<const Vec16<S>*>(row)[v];
        Vec16<S> o;
        const int64_t k0 = v * N;
#pragma unroll
        for (int e = 0; e < N; ++e) {
          const A onehot = (k0 + e == target) ? A(1) : A(0);
          o.v[e] = static_cast<S>(math::categorical_grad(g, static_cast<A>(in.v[e]), m, log_s, onehot));
        }
        reinterpret_cast<Vec16<S>*>(orow)[v] = o;
      }
    } else {
      for (int64_t k = lane; k < K; k += G) {
        const A onehot = (k == target) ? A(1) : A(0);
        orow[k] = static_cast<S>(math::categorical_grad(g, static_cast<A>(row[k]), m, log_s, onehot));
      }
    }
  }
}

template <typename S, typename I>
void Launch<S, I>::backward(const at::Tensor& grad, const at::Tensor& logits, const I* x, const at::Tensor& lse_,
                           int64_t B, int64_t D, int64_t K, at::Tensor& out) {
  using A = at::opmath_type<S>;
  if (B * D == 0) return;
  const S* l = logits.const_data_ptr<S>();
  S* o = out.data_ptr<S>();
  with_layout(K, aligned16(l, K) && aligned16(o, K), [&](auto g, auto vec) {
    constexpr int G = decltype(g)::value;
    const int64_t rows = chunk_rows(D, K, G);
    const int64_t chunks = (D + rows - 1) / rows;
    backward_kernel<G, decltype(vec)::value, S, I><<<cuda::grid_size(B * chunks, "categorical_log_likelihood_backward"),
                                                     kThreads, 0, cuda::stream()>>>(
        grad.const_data_ptr<A>(), l, x, lse_.const_data_ptr<A>(), D, K, rows, chunks, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}


}  // namespace categorical_cuda
}  // namespace hvae_fast
