// Thread layouts shared by the CUDA kernels: a per-row sum in a fixed reduction order
// (no atomics: the same inputs give the same bits, on every run and every GPU), a
// per-row element loop without per-element division, and an element-wise loop.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace hvae_fast {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
// Elements of one row that one block of row_sum's first stage (and of for_rows) takes:
// 16 per thread. A row of M elements is split into ceil(M / kChunk) chunks, a number
// that depends on M alone, so the reduction order does too.
constexpr int64_t kChunk = 16 * kThreads;

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

inline unsigned grid_size(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= INT32_MAX, "hvae_fast: ", what, " needs ", blocks, " blocks, more than one launch takes");
  return static_cast<unsigned>(blocks);
}

// Sum over the block: each warp by shuffles (a fixed butterfly), then warp 0 over the
// warps' sums. The same order on every run. Every thread of the block must call it; the
// result is valid in thread 0. Reusable: it ends with no pending shared-memory reads.
template <typename acc_t>
__device__ inline acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kWarps];
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();  // an earlier call's reads of warp_sums are done
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0;
  if (warp == 0) {
    if (lane < kWarps) v = warp_sums[lane];
    for (int off = kWarps / 2; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  }
  return v;
}

// op over the G lanes of each aligned group of G lanes of a warp (G a power of two <= 32),
// by a xor butterfly: every lane of the group gets the same value, in a fixed order.
// Every lane of the warp must call it.
template <int G, typename T, typename Op>
__device__ inline T group_reduce(T v, const Op& op) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// op over the whole block, the result in every thread: each warp's butterfly, then every
// thread combines the warps' values in the order 0, 1, ... Every thread must call it.
template <typename T, typename Op>
__device__ inline T block_all_reduce(T v, const Op& op) {
  __shared__ T warp_vals[kWarps];
  v = group_reduce<kWarp>(v, op);
  __syncthreads();  // an earlier call's reads of warp_vals are done
  if (threadIdx.x % kWarp == 0) warp_vals[threadIdx.x / kWarp] = v;
  __syncthreads();
  v = warp_vals[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = op(v, warp_vals[w]);
  return v;
}

// Stage 1 of row_sum: block (b, c) sums chunk c of row b, f(b, b * M + j) for j in the
// chunk; into out[b] when the row is one chunk, else into partial[b * chunks + c].
template <typename acc_t, typename out_t, typename F>
__global__ void __launch_bounds__(kThreads) row_sum_kernel(int64_t M, int64_t chunks, out_t* out, acc_t* partial, F f) {
  const int64_t blk = blockIdx.x;
  const int64_t b = static_cast<uint32_t>(blk) / static_cast<uint32_t>(chunks);  // once per block, 32-bit (grid_size)
  const int64_t c = blk - b * chunks;
  const int64_t j1 = std::min<int64_t>(M, (c + 1) * kChunk);
  const int64_t base = b * M;
  acc_t acc = 0;
  for (int64_t j = c * kChunk + threadIdx.x; j < j1; j += kThreads) acc += f(b, base + j);
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    if (chunks == 1) out[b] = static_cast<out_t>(acc);
    else partial[blk] = acc;
  }
}

// Stage 2: out[b] = the sum of row b's `chunks` partial sums, one block per row, in a
// fixed order (thread t takes partials t, t + kThreads, ...; then block_sum).
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads) row_sum_finish_kernel(int64_t chunks, const acc_t* partial, out_t* out) {
  const int64_t b = blockIdx.x;
  acc_t acc = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) acc += partial[b * chunks + c];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[b] = static_cast<out_t>(acc);
}

// out[b] = sum over j < M of f(b, b * M + j), accumulated in acc_t. Two stages when a row
// is longer than one chunk: partial sums by a grid of B * ceil(M / kChunk) blocks (B = 4
// rows of a million fill the GPU), then their fixed-order sum. Bit-deterministic: the
// split and every order depend on (B, M) only. The partial sums live in a temporary from
// torch's caching allocator on `device` (CUDA-graph safe).
template <typename acc_t, typename out_t, typename F>
void row_sum(int64_t B, int64_t M, out_t* out, const at::Device& device, F f) {
  if (B == 0) return;
  const int64_t chunks = std::max<int64_t>(1, (M + kChunk - 1) / kChunk);
  at::Tensor partial;
  acc_t* pp = nullptr;
  if (chunks > 1) {
    partial = at::empty({B * chunks}, at::TensorOptions().device(device).dtype(c10::CppTypeToScalarType<acc_t>::value));
    pp = partial.data_ptr<acc_t>();
  }
  row_sum_kernel<acc_t><<<grid_size(B * chunks, "a row sum"), kThreads, 0, stream()>>>(M, chunks, out, pp, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 1) {
    row_sum_finish_kernel<acc_t><<<grid_size(B, "a row sum"), kThreads, 0, stream()>>>(chunks, pp, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// for_rows, rows of at least kThreads elements: block (b, c) runs f(b, b * M + j) over
// chunk c of row b. The row index comes from the block, not from each element.
template <typename F>
__global__ void __launch_bounds__(kThreads) rows_kernel(int64_t M, int64_t chunks, F f) {
  const int64_t blk = blockIdx.x;
  const int64_t b = static_cast<uint32_t>(blk) / static_cast<uint32_t>(chunks);  // 32-bit: chunks <= blocks < 2^31
  const int64_t c = blk - b * chunks;
  const int64_t j1 = std::min<int64_t>(M, (c + 1) * kChunk);
  const int64_t base = b * M;
  for (int64_t j = c * kChunk + threadIdx.x; j < j1; j += kThreads) f(b, base + j);
}

// for_rows, short rows (fewer than kThreads elements) of B * M <= 2^31 - 1 elements in all:
// flat element-wise, the row from a 32-bit multiply-and-shift divider (ATen's, whose 32-bit
// sum wraps for indices of 2^31 and more unless M is a power of two).
template <typename F>
__global__ void __launch_bounds__(kThreads) short_rows_kernel(uint32_t n, at::cuda::detail::IntDivider<uint32_t> per_row,
                                                              F f) {
  const uint32_t i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) f(static_cast<int64_t>(per_row.div(i)), static_cast<int64_t>(i));
}

// f(b, i) for every element i = b * M + j of B rows of M: the per-element loop of the
// backward kernels that broadcast a per-example gradient, with no 64-bit division per
// element.
template <typename F>
void for_rows(int64_t B, int64_t M, F f) {
  const int64_t n = B * M;
  if (n == 0) return;
  if (M < kThreads && n <= static_cast<int64_t>(INT32_MAX)) {
    short_rows_kernel<<<grid_size((n + kThreads - 1) / kThreads, "an element-wise loop"), kThreads, 0, stream()>>>(
        static_cast<uint32_t>(n), at::cuda::detail::IntDivider<uint32_t>(static_cast<uint32_t>(M)), f);
  } else {
    const int64_t chunks = (M + kChunk - 1) / kChunk;
    rows_kernel<<<grid_size(B * chunks, "a row loop"), kThreads, 0, stream()>>>(M, chunks, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(int64_t n, F f) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}
// The same with a minimum of MinBlocks blocks per multiprocessor in its launch bounds.
template <int MinBlocks, typename F>
__global__ void __launch_bounds__(kThreads, MinBlocks) elementwise_kernel_min(int64_t n, F f) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

// f(i) for i in [0, n), int64 indices, grid-stride. MinBlocks > 0: the kernel's launch bounds
// name that minimum of resident blocks per multiprocessor (a register budget of 64K / (256
// MinBlocks) per thread). Given the block size alone, ptxas may hold a kernel to fewer registers
// than it needs and spill (the float64 dmol forward: 64 registers, 60 bytes spilled).
template <int MinBlocks = 0, typename F>
void elementwise(int64_t n, F f) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8);
  if constexpr (MinBlocks > 0) {
    elementwise_kernel_min<MinBlocks><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(n, f);
  } else {
    elementwise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(n, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace hvae_fast
