// Thread layouts shared by the CUDA kernels: an element-wise loop and a per-row sum
// with a fixed reduction order (no atomics: the same inputs give the same bits).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace hvae_fast {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the block by a shared-memory tree: the same order on every run.
template <typename acc_t>
__device__ inline acc_t block_sum(acc_t v) {
  __shared__ __align__(sizeof(double)) unsigned char smem[kThreads * sizeof(double)];
  acc_t* buf = reinterpret_cast<acc_t*>(smem);
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

template <typename acc_t, typename out_t, typename F>
__global__ void row_sum_kernel(int64_t M, out_t* out, F f) {
  const int64_t b = blockIdx.x;
  acc_t acc = 0;
  for (int64_t j = threadIdx.x; j < M; j += kThreads) acc += f(b, b * M + j);
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[b] = static_cast<out_t>(acc);
}

// out[b] = sum over j < M of f(b, b * M + j); one block per row b.
template <typename acc_t, typename out_t, typename F>
void row_sum(int64_t B, int64_t M, out_t* out, F f) {
  TORCH_CHECK(B <= INT32_MAX, "hvae_fast: batch of ", B, " rows is too large for one launch");
  row_sum_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(M, out, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
__global__ void elementwise_kernel(int64_t n, F f) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

// f(i) for i in [0, n), int64 indices, grid-stride.
template <typename F>
void elementwise(int64_t n, F f) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8);
  elementwise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace hvae_fast
