// CUDA kernels of hvae_fast::categorical_log_likelihood and its backward.
//
// Layout, chosen by K alone (so the reduction order, and the bits, depend on K, not on the
// number of rows): a row of K logits is taken by a team of G threads, G = 4, 8, 16 (several
// rows per warp: K <= 64), 32 (a warp: K < 2048) or the whole block of 256 (a block per
// row: K >= 2048). Block (b, c) of the grid takes chunk c of example b's D rows: the
// per-example sum of the forward and the upstream gradient of the backward come from the
// block, not from a division per row or per element. Rows whose K is a multiple of a
// 16-byte vector, at an aligned address, are read (and written) in 16-byte vectors.
//
// Forward, per row (line by line as csrc/cpu/categorical_log_likelihood.cpp): the max m
// by shift_max_, s = sum of lse_exp_term(l, m), log s; (m, log s) saved in float32 for
// the backward; the row's log_softmax_at of its class, summed into the example's total
// in the same kernel (one launch and no temporary when an example's rows fit in one
// chunk, else a second, fixed-order sum of the chunks' partial sums: cuda::row_sum's).
// Backward, per row: the class index, (m, log s) and the example's gradient loaded once,
// then categorical_grad over the row; out may be logits itself (the in-place op): each
// thread reads its logits before it writes the same elements.
//
// A class index out of range is a device-side assert (CUDA_KERNEL_ASSERT): the CUDA
// context is unusable afterwards; the CPU kernels raise a catchable IndexError instead.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>

#include "../inputs.h"
#include "../formulas.h"
#include "launch.cuh"

namespace hvae_fast {
namespace {

using cuda::kThreads;

// Logits per block and chunk, about: enough work per block to hide the launch, enough
// blocks to fill the GPU at B = 128.
constexpr int64_t kChunkElems = 16384;

// Threads per row for K classes (the module comment).
int team_size(int64_t K) {
  if (K <= 16) return 4;
  if (K <= 32) return 8;
  if (K <= 64) return 16;
  if (K < 2048) return 32;
  return kThreads;
}

// Rows of one example per block: whole passes of the block's teams.
int64_t chunk_rows(int64_t D, int64_t K, int G) {
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
bool aligned16(const S* p, int64_t K) {
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
void launch_forward(const at::Tensor& logits, const I* x, int64_t B, int64_t D, int64_t K, at::Tensor& ll,
                    at::Tensor& lse) {
  const S* l = logits.const_data_ptr<S>();
  with_layout(K, aligned16(l, K), [&](auto g, auto vec) {
    launch_forward_as<decltype(g)::value, decltype(vec)::value>(l, x, B, D, K, ll, lse);
  });
}

std::tuple<at::Tensor, at::Tensor> categorical_log_likelihood_cuda(const at::Tensor& logits_,
                                                                    const at::Tensor& x_, bool /*overwrite_logits: read by the autograd backward*/) {
  constexpr const char* op = "categorical_log_likelihood";
  check_likelihood(logits_, x_, true, op);
  const c10::cuda::CUDAGuard guard(logits_.device());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_index(x_);
  const int64_t B = logits.size(0), K = logits.size(-1), D = x.numel() / B;
  const auto acc = at::toOpMathType(logits.scalar_type());
  at::Tensor ll = at::empty({B}, logits.options());
  at::Tensor lse = at::empty(lse_shape(x_), logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    dispatch_index(x, [&](const auto* xp) { launch_forward<scalar_t>(logits, xp, B, D, K, ll, lse); });
  });
  return {ll, lse};
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
void launch_backward(const at::Tensor& grad, const at::Tensor& logits, const I* x, const at::Tensor& lse_,
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

// out = grad * (onehot(x) - softmax(logits)); out may be logits itself (the in-place op).
void backward_into(const char* op, const at::Tensor& grad, const at::Tensor& logits_, const at::Tensor& x_,
                   const at::Tensor& lse_, const at::Tensor& out) {
  check_likelihood(logits_, x_, true, op);
  const c10::cuda::CUDAGuard guard(logits_.device());
  const int64_t B = logits_.size(0), K = logits_.size(-1);
  check_grad_batch(grad, B, logits_, op);
  check_lse(lse_, x_, logits_, op);
  const auto acc = at::toOpMathType(logits_.scalar_type());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor x = as_index(x_);
  const at::Tensor lse = lse_.to(acc).contiguous();
  const at::Tensor g = grad.to(acc).contiguous();
  const int64_t D = x.numel() / B;
  at::Tensor o = out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "categorical_log_likelihood_backward", [&] {
    dispatch_index(x, [&](const auto* xp) { launch_backward<scalar_t>(g, logits, xp, lse, B, D, K, o); });
  });
}

at::Tensor categorical_log_likelihood_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                    const at::Tensor& x, const at::Tensor& lse) {
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  backward_into("categorical_log_likelihood_backward", grad, logits, x, lse, out);
  return out;
}

void categorical_log_likelihood_backward__cuda(const at::Tensor& grad, const at::Tensor& logits,
                                               const at::Tensor& x, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "categorical_log_likelihood_backward_: logits must be contiguous "
                    "to hold their own gradient");
  backward_into("categorical_log_likelihood_backward_", grad, logits, x, lse, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("categorical_log_likelihood", &categorical_log_likelihood_cuda);
  m.impl("categorical_log_likelihood_backward", &categorical_log_likelihood_backward_cuda);
  m.impl("categorical_log_likelihood_backward_", &categorical_log_likelihood_backward__cuda);
}

}  // namespace hvae_fast
